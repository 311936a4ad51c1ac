"""Every method on every family under FlashAttention, through transformers' real FlashAttention code with
pure-PyTorch stand-in kernels on the CPU (tests/flash_stand_in.py, docs/flash-attention.md).

The contract of the matrix under FlashAttention-2, FlashAttention-2 against SDPA for the same compression,
every attention call (decoder and vision tower) served by the kernel, the gapped-positions trap, and
FlashAttention-3 (the same transformers path) on a few cells.
"""
from __future__ import annotations

import pytest
import torch

import flash_stand_in
import tokensieve as ts
from contract import check_attention_implementations, forward_logits
from families import FAMILIES, built
from test_matrix import CELLS, SMALL_CELLS, cell_id, method_of, run_contract, run_small_image, runnable_method
from tiny import llava_inputs, row_inputs, tiny_llava

FA2 = "flash_attention_2"
pytestmark = pytest.mark.usefixtures("flash_kernels")


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_cell_under_flash_attention_2(cell):
    """The whole contract (keep-all, cache, batch = rows, second turn, reuse, copies) on the FA2 model."""
    run_contract(cell, FA2)


@pytest.mark.parametrize("cell", SMALL_CELLS, ids=cell_id)
def test_batch_with_a_very_small_image_under_flash_attention_2(cell):
    """A 4-token image beside a 64-token one (heavy left padding after compaction): counts, floors, rows alone."""
    run_small_image(cell, FA2)


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_cell_flash_attention_2_equals_sdpa(cell):
    """FA2 and SDPA keep the same tokens and give the same logits (1e-4) and greedy tokens."""
    method = runnable_method(cell, FA2)
    if method is None:
        return
    family = cell[1]
    check_attention_implementations(lambda attn: built(family, attn), FAMILIES[family].batch(built(family)), method,
                                    steps=3, implementations=("sdpa", FA2))


def attention_modules(model) -> list[torch.nn.Module]:
    """Every attention module of the model: decoder layers' `self_attn`, CLIP/SigLIP's, Qwen ViT blocks' `attn`."""
    return [m for name, m in model.named_modules() if name.endswith((".self_attn", ".attn"))]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", ["ApET", "ALVTS", "VisionZip", "PDrop"])
def test_every_attention_call_goes_to_the_flash_kernel(family, name):
    """Methods that read attention compute it outside the kernel: every attention module the compressed
    forward calls, in the decoder and in the vision tower, is served by one call of the stand-in kernel
    (nothing falls back to eager or SDPA; Qwen-VL's vision tower takes its `cu_seqlens` branch, where the
    other branch would call the kernel once per image)."""
    method = runnable_method((name, family), FA2)
    if method is None:
        return
    model = built(family, FA2)
    calls, handles = [], []
    for module in attention_modules(model):
        handles.append(module.register_forward_hook(lambda *_: calls.append(1)))
    try:
        before = flash_stand_in.CALLS.copy()
        with ts.compress(model, method):
            forward_logits(model, FAMILIES[family].batch(model))
        served = flash_stand_in.CALLS - before
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) > len(model.model.language_model.layers)
    assert served.total() == len(calls), (served, len(calls))


def test_gapped_positions_with_a_cache_are_not_read_as_packed_sequences():
    """A batch of one continued on its cache with a chunk whose positions have gaps: transformers' FA2 path
    reads such positions as packed sequences and the chunk attends to the wrong keys, without an error.
    The untouched FA2 model shows the trap (so this test can fail); under compress, whose kept tokens keep
    their original positions, FA2 gives what SDPA gives."""
    sdpa, flash = tiny_llava("sdpa"), flash_stand_in.as_flash(tiny_llava("sdpa"))
    row = row_inputs(llava_inputs(sdpa, [(5, 7), (2, 3)]), 0)
    length = row["input_ids"].shape[1]
    chunk = dict(input_ids=torch.tensor([[5, 6, 7]]), position_ids=torch.tensor([[length, length + 1, length + 3]]),
                 attention_mask=torch.ones(1, length + 3, dtype=torch.long))

    def continued(model):
        with torch.no_grad():
            cache = model(**row, use_cache=True).past_key_values
            return model(**chunk, cache=cache, use_cache=True).logits.float()

    assert not torch.allclose(continued(sdpa), continued(flash), atol=1e-2)  # the trap, in transformers itself
    method = ts.ApET(ratio=0.25, num_basis=2)
    with ts.compress(sdpa, method) as handle:
        reference = continued(sdpa)
    assert (handle.stats.positions[0, 1:] - handle.stats.positions[0, :-1] > 1).any()  # the prefill has gaps
    with ts.compress(flash, method):
        torch.testing.assert_close(continued(flash), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell", [("ApET", "llava"), ("ALVTS", "qwen2_5_vl"), ("FastV", "llava_next"),
                                  ("VisionZip", "qwen2_vl")], ids=cell_id)
def test_flash_attention_3_equals_sdpa(cell):
    """FlashAttention-3 takes the same transformers path (its own kernel signatures): the same answer."""
    family = cell[1]
    check_attention_implementations(lambda attn: built(family, attn), FAMILIES[family].batch(built(family)),
                                    method_of(cell[0]), steps=3, implementations=("sdpa", "flash_attention_3"))


def test_untested_implementations_are_refused_naming_the_supported_ones():
    model = tiny_llava("sdpa")
    for attention in ("flex_attention", "flash_attention_4", "kernels-community/flash-attn2"):
        model.config._attn_implementation = attention
        with pytest.raises(ValueError, match=f"{attention}.*'sdpa', 'eager', 'flash_attention_2', 'flash_attention_3'"):
            ts.compress(model, ts.ApET(budget=64))
    model.config._attn_implementation = "sdpa"
    model.config.vision_config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention.*vision_config"):
        ts.compress(model, ts.ApET(budget=64))
