"""The FlashAttention contract on a CUDA GPU in bfloat16 with the real kernel (run by
src/tokensieve/bench/gpu_check.sh; not collected by `make test`: run it by naming the file).

    TOKENSIEVE_GPU_ATTN=flash_attention_2 python -m pytest tests/gpu_flash_check.py

Every method x family cell of the matrix on the tiny models, moved to CUDA in bfloat16 and switched to
`TOKENSIEVE_GPU_ATTN` with `set_attn_implementation` (transformers' own check that the kernel is installed),
against the same model under SDPA on the same GPU. bfloat16 keeps about 3 significant digits, enough to
change which tokens a method keeps on a tiny random model, so where the CPU suite asks for 1e-4 and equal
tokens, this compares FlashAttention with SDPA on the same kept tokens (SDPA's, replayed under both by
`Replay`; for ALVTS, whose routing has no replay, when both kept the same) by the cosine similarity of the
logits (each prompt alone too), and checks exactly only what rounding cannot change: the counts per
layer (against SDPA's), a second turn continuing the compressed cache; the first generated token is the
forward pass's argmax or ties with it within rounding.
"""
from __future__ import annotations

import os

import pytest
import torch

import tokensieve as ts
from contract import next_turn
from families import FAMILIES, built
from test_matrix import CELLS, cell_id, runnable_method

if not torch.cuda.is_available():
    raise RuntimeError("tests/gpu_flash_check.py runs on a CUDA GPU; the CPU suite tests FlashAttention with stand-in kernels")

ATTN = os.environ.get("TOKENSIEVE_GPU_ATTN", "flash_attention_2")
DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16
CLOSE = 0.99  # least cosine similarity of two bfloat16 logit rows that should agree


def on_gpu(model, attn: str):
    model = model.to(DEVICE, DTYPE)
    model.set_attn_implementation(attn)
    return model


_MODELS: dict = {}


def gpu_model(family: str, attn: str):
    """The family's tiny model (the CPU suite's weights) on the GPU in bfloat16 under `attn`, built once."""
    if (family, attn) not in _MODELS:
        _MODELS[family, attn] = on_gpu(FAMILIES[family].make("sdpa"), attn)
    return _MODELS[family, attn]


def to_gpu(inputs: dict) -> dict:
    return {k: v.to(DEVICE, DTYPE) if v.is_floating_point() else v.to(DEVICE) for k, v in inputs.items()}


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1].float()


def assert_close_rows(a: torch.Tensor, b: torch.Tensor) -> None:
    similarity = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert (similarity >= CLOSE).all(), similarity.tolist()


def same_kept(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[s], y[s]) for s in x) for x, y in zip(a, b))


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_cell_on_gpu(cell):
    method = runnable_method(cell)  # a refused cell checks its refusal on the CPU model
    if method is None:
        return
    family = cell[1]
    case, model, sdpa = FAMILIES[family], gpu_model(family, ATTN), gpu_model(family, "sdpa")
    batch = case.batch(built(family))
    inputs = to_gpu(batch)
    with ts.compress(sdpa, method) as handle:
        expected = logits(sdpa, inputs)
        reference = handle.stats
        replay = ts.Replay.from_handle(handle) if handle.schedule.routing is None else None
    with ts.compress(model, method) as handle:
        got = logits(model, inputs)
        stats = handle.stats
        with torch.no_grad():
            first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        token = first.sequences[:, batch["input_ids"].shape[1] :][:, :1]  # the forward's argmax, up to a rounding tie
        assert (got.gather(1, token)[:, 0] >= got.max(-1).values - 0.01 * got.abs().max()).all()
        turn = to_gpu(next_turn(batch, first.sequences.cpu(), torch.tensor([[7, 8, 9]])))
        with torch.no_grad():  # continues the compressed cache of the generate just above
            second = model.generate(**turn, cache=first.past_key_values, max_new_tokens=2, do_sample=False)
        assert second.shape[1] == turn["input_ids"].shape[1] + 2
        for i, row in enumerate(case.rows(batch)):
            assert_close_rows(got[i : i + 1], logits(model, to_gpu(row)))
    assert torch.equal(stats.tokens_per_layer, reference.tokens_per_layer)  # rounding cannot change the counts
    if replay is not None:  # SDPA's kept tokens replayed under both: only the attention differs
        with ts.compress(sdpa, replay):
            expected = logits(sdpa, inputs)
        with ts.compress(model, replay):
            got = logits(model, inputs)
        assert_close_rows(got, expected)
    elif same_kept(stats.kept, reference.kept):  # ALVTS: no replay of routing across models
        assert_close_rows(got, expected)
