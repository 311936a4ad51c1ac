"""Selectors identify their model by its weights whatever dtype it is loaded in: selectors calibrated on
a float32 checkpoint are accepted on it in bfloat16 or float16 (and the other way round), a model with
other weights is still refused, and files saved before the dtype-free fingerprint still load."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import tokensieve as ts
from contract import forward_logits
from tiny import llava_inputs, tiny_llava
from tokensieve.selectors import Selectors, model_identity, svd_selectors

HALF = [torch.bfloat16, torch.float16]


def layers_of(model) -> torch.nn.ModuleList:
    return model.model.language_model.layers


def selectors_of(model) -> Selectors:
    return svd_selectors("llava", layers_of(model), rank=8, start_layer=0)


def alvts(selectors) -> ts.ALVTS:
    return ts.ALVTS(ratio=64 / 576, start_layer=0, selectors=selectors)


@pytest.fixture(scope="module")
def float32_selectors(model) -> Selectors:
    return selectors_of(model)


def cast(model, dtype: torch.dtype):
    return copy.deepcopy(model).to(dtype)


def accepted(model, selectors) -> bool:
    """compress accepts the selectors on the model (and a forward runs under them)."""
    with ts.compress(model, alvts(selectors)) as handle:
        forward_logits(model, llava_inputs(model, [(3, 4)]))
    return handle.stats.tokens_per_layer[0].tolist() == [16, 16, 16, 16]


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_selectors_are_accepted_in_half_precision(model, float32_selectors, dtype):
    assert accepted(cast(model, dtype), float32_selectors)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_saved_float32_selectors_are_accepted_in_half_precision(model, float32_selectors, dtype, tmp_path):
    path = tmp_path / "selectors.safetensors"
    float32_selectors.save(path)
    assert accepted(cast(model, dtype), str(path))


@pytest.mark.parametrize("calibrated", HALF, ids=str)
@pytest.mark.parametrize("used", [torch.float32, *HALF], ids=str)
def test_half_precision_selectors_are_accepted_in_every_dtype(model, calibrated, used):
    selectors = selectors_of(cast(model, calibrated))
    assert accepted(cast(model, used), selectors)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_other_weights_are_refused_in_every_dtype(float32_selectors, dtype):
    other = tiny_llava("sdpa", seed=1).to(dtype)
    with pytest.raises(ts.SelectorMismatchError, match=r"weight fingerprint: the q/k weights of decoder layers 0\.\.3 "
                                                        "differ by more than a change of dtype explains"):
        ts.compress(other, alvts(float32_selectors))


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_one_retrained_layer_is_refused(model, float32_selectors, dtype):
    """Weights 2% off in one layer's query projection: well above any rounding, so another model."""
    changed = cast(model, torch.float32)
    weight = layers_of(changed)[2].self_attn.q_proj.weight
    with torch.no_grad():
        weight.add_(0.02 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ts.SelectorMismatchError, match=r"the q/k weights of decoder layers \[2\] differ"):
        ts.compress(changed.to(dtype), alvts(float32_selectors))


def test_identity_is_the_same_in_every_dtype_but_the_legacy_hash(model):
    """Only the dtype-dependent hash older files are checked with changes with the dtype."""
    identities = [model_identity("llava", layers_of(cast(model, dtype))) for dtype in [torch.float32, *HALF]]
    float32, *halves = identities
    for half in halves:
        Selectors([None] * 4, float32).check_model(half)
        assert {k: v for k, v in half.items() if k not in ("fingerprint", "weight_signature")} == {
            k: v for k, v in float32.items() if k not in ("fingerprint", "weight_signature")}


# --------------------------------------------------------------------------- files saved before the signature
def legacy_file(selectors: Selectors, path) -> str:
    """The selectors saved as before the dtype-free fingerprint: identity without weight_signature."""
    identity = {k: v for k, v in selectors.identity.items() if k != "weight_signature"}
    Selectors(selectors.layers, identity, selectors.fidelity).save(path)
    return str(path)


def test_legacy_file_is_accepted_in_its_own_dtype(model, float32_selectors, tmp_path):
    assert accepted(model, legacy_file(float32_selectors, tmp_path / "old.safetensors"))


def test_legacy_file_in_another_dtype_says_why(model, float32_selectors, tmp_path):
    path = legacy_file(float32_selectors, tmp_path / "old.safetensors")
    with pytest.raises(ts.SelectorMismatchError, match="matches its model only in the dtype it was calibrated in"):
        ts.compress(cast(model, torch.bfloat16), alvts(path))


def test_legacy_file_on_other_weights_is_refused(float32_selectors, tmp_path):
    path = legacy_file(float32_selectors, tmp_path / "old.safetensors")
    with pytest.raises(ts.SelectorMismatchError, match="fingerprint"):
        ts.compress(tiny_llava("sdpa", seed=1), alvts(path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_shipped_selectors_still_match_the_shipped_checkpoint(dtype):
    """The shipped checkpoint's selectors file (tokensieve/smallvlm/checkpoint) predates the signature; the
    checkpoint's weights are float16, so its float32 and float16 loads have the same legacy hash."""
    from tokensieve.bench import accuracy as A
    from tokensieve.smallvlm import model as M
    from tokensieve.smallvlm.calibrate import SELECTORS

    path = A.CHECKPOINT / SELECTORS
    with safe_open(str(path), framework="pt") as f:
        assert "weight_signature" not in json.loads(f.metadata()["identity"])
    shipped, _ = M.load(str(A.CHECKPOINT), dtype=dtype)
    ts.compress(shipped, ts.ALVTS(ratio=64 / 576, start_layer=0, selectors=str(path))).remove()
