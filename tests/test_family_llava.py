"""The test contract (tests/contract.py) on a tiny LLaVA-1.5 built from a config (CLIP 12x12 = 144 tokens)."""
from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from contract import (
    check_attention_implementations,
    check_batch_equals_rows,
    check_cache_generation,
    check_keep_all,
    check_removal,
    check_save_load_roundtrip,
    check_schedule_counts,
)
from tiny import llava_inputs, row_inputs, tiny_llava

N = 144
# 64 of 576 tokens, scaled to 144: stage 1 keeps 24, stage 2 keeps 8 (num_basis 4 leaves room)
APET_64 = ts.ApET(ratio=64 / 576, num_basis=4)


def hooked(model) -> list[str]:
    return ["model", "model.language_model", "model.multi_modal_projector", "model.language_model.layers.2"]


def test_keep_all_is_identical(model, batch):
    check_keep_all(model, batch, ts.ApET(ratio=1.0))


def test_removal_restores_model(model, batch):
    check_removal(model, batch, APET_64, hooked)


def test_cache_generation_equals_no_cache(model, batch):
    check_cache_generation(model, batch, APET_64)


def test_batch_equals_each_row(model, batch):
    check_batch_equals_rows(model, batch, [row_inputs(batch, 0), row_inputs(batch, 1)], APET_64)


@pytest.mark.parametrize("method,per_layer", [
    (APET_64, [24, 24, 8, 8]),
    (ts.ApET(ratio=128 / 576, num_basis=4), [48, 48, 16, 16]),
    (ts.ApET(stage1=30, stage2=12, layer=1, num_basis=4), [30, 12, 12, 12]),
    (ts.ApET(budget=100, num_basis=4), [144, 144, 56, 56]),
])
def test_tokens_per_layer_follow_schedule(model, batch, method, per_layer):
    handle = check_schedule_counts(model, batch, method, [N, N])
    assert handle.stats.tokens_per_layer[0].tolist() == per_layer  # written out by hand
    kept = handle.stats.kept[0]
    assert kept["stage1"].numel() == per_layer[0] and kept["stage2"].numel() == per_layer[-1]
    assert set(kept["stage2"].tolist()) <= set(kept["stage1"].tolist())


def test_budget_means_tokens_per_layer(model, batch):
    handle = check_schedule_counts(model, batch, ts.ApET(ratio=64 / 576, num_basis=4), [N, N])
    assert handle.stats.mean_tokens_per_layer.tolist() == [16.0, 16.0]  # 64/576 of 144


def test_stage1_keeps_what_the_operator_keeps(model, batch):
    """Stage 1's kept tokens are ApET's picks on the projector's input features, computed here directly."""
    with torch.no_grad():
        tower = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
        features = tower.hidden_states[-2][:, 1:]
    _, expected = ts.ops.apet_reduce(features, keep=24, num_basis=4, start=int(torch.randint(N, (1,), generator=torch.Generator().manual_seed(0))))
    with ts.compress(model, APET_64) as handle:
        model(**batch)
    for i in range(2):
        assert torch.equal(handle.stats.kept[i]["stage1"], expected[i])


def test_sdpa_and_eager_agree(batch):
    check_attention_implementations(tiny_llava, batch, APET_64)


def test_save_load_roundtrip(model, batch, tmp_path):
    check_save_load_roundtrip(model, batch, APET_64, tmp_path)


def test_half_precision_model_runs():
    model = tiny_llava("sdpa").to(torch.bfloat16)
    inputs = llava_inputs(model, [(3, 4)])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with ts.compress(model, APET_64) as handle, torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits.float()).all()
    assert handle.stats.tokens_per_layer[0].tolist() == [24, 24, 8, 8]


def test_text_only_prompt_is_untouched(model):
    ids = torch.randint(1, 100, (1, 9))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with ts.compress(model, APET_64) as handle:
            out = model(input_ids=ids).logits
    assert handle.stats is None
    assert torch.equal(out, reference)


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "needs a budget"),
    (dict(budget=64, ratio=0.1), "not both"),
    (dict(ratio=1.5), "ratio must be"),
    (dict(budget=-3), "positive"),
    (dict(stage1=5, num_basis=10), "at least num_basis"),
    (dict(stage1=40, stage2=50), "cannot keep more"),
    (dict(budget=64, basis_blend=2.0), "basis_blend"),
])
def test_bad_method_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ts.ApET(**kwargs)


def test_errors_before_anything_is_touched(model):
    from contract import module_snapshot

    before = module_snapshot(model)
    with pytest.raises(ValueError, match="layer must be in"):
        ts.compress(model, ts.ApET(budget=64, layer=4))
    with pytest.raises(ValueError, match="below this method's minimum"):
        ts.compress(model, ts.ApET(budget=2))  # stage 2 would keep 1 token, fewer than 11 basis + 1
    with pytest.raises(TypeError, match="not a tokensieve method"):
        ts.compress(model, "apet")
    eager_only = tiny_llava("sdpa")
    eager_only.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attention implementation"):
        ts.compress(eager_only, APET_64)
    assert module_snapshot(model) == before


def test_unsupported_model_names_supported_types():
    from transformers import LlamaForCausalLM
    from tiny import tiny_llama_config

    with pytest.raises(ValueError, match="supported model_types: .*llava"):
        ts.compress(LlamaForCausalLM(tiny_llama_config()), APET_64)


def test_importing_changes_nothing_in_transformers():
    import subprocess
    import sys

    code = (
        "import transformers.models.llama.modeling_llama as m, transformers.masking_utils as mu;"
        "before = (dict(vars(m.LlamaDecoderLayer)), dict(vars(m.LlamaModel)), dict(vars(mu)));"
        "import tokensieve;"
        "after = (dict(vars(m.LlamaDecoderLayer)), dict(vars(m.LlamaModel)), dict(vars(mu)));"
        "assert all(a.keys() == b.keys() and all(a[k] is b[k] for k in a) for a, b in zip(before, after))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
