"""Bad method arguments are clear errors raised when the method is built, before any model is touched:
TypeError for a wrong type, ValueError for a wrong range, both naming the field and what to pass.
Also: a method holding Selectors compares, hashes and prints; messages never print a range "0..-1";
ALVTS on a model whose weights are on the meta device says so."""
from __future__ import annotations

import re

import pytest
import torch

import tokensieve as ts
from tiny import tiny_llava
from tokensieve.methods.alvts import layer_counts
from tokensieve.methods.base import check_ratio_reachable
from tokensieve.selectors import svd_selectors

METHODS = [ts.ALVTS, ts.ApET, ts.DART, ts.DivPrune, ts.FastV, ts.PDrop, ts.Random, ts.VisionZip]
NOT_INT = [True, "2", 2.0]  # a bool, a string, a float where an int belongs


def quoted(value) -> str:
    """The value as a message prints it: `got '64' (str)`."""
    return re.escape(f"got {value!r} ({type(value).__name__})")


# ------------------------------------------------------------------------------- budget and ratio
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("budget", ["64", True, False, [64], torch.tensor(64.0)], ids=repr)
def test_budget_of_the_wrong_type_is_a_type_error(method, budget):
    with pytest.raises(TypeError, match=r"budget must be a number of visual tokens such as 64, " + quoted(budget)):
        method(budget=budget)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("ratio", ["0.25", True], ids=repr)
def test_ratio_of_the_wrong_type_is_a_type_error(method, ratio):
    with pytest.raises(TypeError, match=r"ratio must be a fraction of the visual tokens such as 0\.25, " + quoted(ratio)):
        method(ratio=ratio)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("budget", [0, -3, float("nan")], ids=repr)
def test_budget_out_of_range_says_what_to_pass(method, budget):
    with pytest.raises(ValueError, match=r"budget must be a positive number of visual tokens such as 64, got"):
        method(budget=budget)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("ratio", [0.0, 1.5], ids=repr)
def test_ratio_out_of_range_says_what_to_pass(method, ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\], e\.g\. 0\.25 for a quarter of the visual tokens"):
        method(ratio=ratio)


# ------------------------------------------------------------------------------- integer fields
INT_FIELDS = [
    # (method, valid other arguments, field, what the message says to pass)
    (ts.ALVTS, {"budget": 64}, "start_layer", "a decoder layer index such as 1"),
    (ts.ALVTS, {"budget": 64}, "rank", "a selector rank such as 64"),
    (ts.ApET, {}, "stage1", "a number of visual tokens such as 96"),
    (ts.ApET, {"stage1": 96}, "stage2", "a number of visual tokens such as 32"),
    (ts.ApET, {"budget": 64}, "layer", "a decoder layer index such as 16"),
    (ts.ApET, {"budget": 64}, "num_basis", "a number of basis tokens such as 10"),
    (ts.ApET, {"budget": 64}, "seed", "an int seed such as 0"),
    (ts.DART, {"budget": 64}, "layer", "a decoder layer index such as 2"),
    (ts.DART, {"budget": 64}, "pivots", "an even number of pivot tokens such as 8"),
    (ts.FastV, {"budget": 64}, "layer", "a decoder layer index such as 2"),
    (ts.FastV, {}, "kept", "a number of visual tokens such as 64"),
    (ts.PDrop, {"budget": 64}, "reference_tokens", "a number of visual tokens such as 576"),
    (ts.Random, {"budget": 64}, "seed", "a non-negative int seed such as 0"),
]


@pytest.mark.parametrize("method,others,field,what", INT_FIELDS, ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize("value", NOT_INT, ids=repr)
def test_int_field_of_the_wrong_type_is_a_type_error(method, others, field, what, value):
    with pytest.raises(TypeError, match=re.escape(f"{field} must be {what}, ") + quoted(value)):
        method(**others, **{field: value})


REAL_FIELDS = [
    (ts.ApET, "eps", "a small positive number such as 1e-5", "1e-5"),
    (ts.ApET, "basis_blend", "a weight in [0, 1] such as 0.5", True),
    (ts.PDrop, "lambda_", "the ratio between consecutive stages such as 0.5", "0.5"),
    (ts.VisionZip, "contextual", "a share of the kept tokens in [0, 1) such as 0.15625", "10/64"),
]


@pytest.mark.parametrize("method,field,what,value", REAL_FIELDS, ids=lambda v: getattr(v, "__name__", None))
def test_number_field_of_the_wrong_type_is_a_type_error(method, field, what, value):
    with pytest.raises(TypeError, match=re.escape(f"{field} must be {what}, ") + quoted(value)):
        method(budget=64, **{field: value})


@pytest.mark.parametrize("value", ["no", 0, None], ids=repr)
def test_apet_merge_must_be_a_bool(value):
    with pytest.raises(TypeError, match=r"merge must be True or False, " + quoted(value)):
        ts.ApET(budget=64, merge=value)


@pytest.mark.parametrize("layers,wrong", [((8, "16", 24), "'16' (str)"), ((True, 2), "True (bool)"),
                                          ((8.0, 16.0), "8.0 (float)")])
def test_pdrop_layers_must_be_ints(layers, wrong):
    with pytest.raises(TypeError, match=re.escape(f"layers must be a tuple of decoder layer indices such as (8, 16, 24), "
                                                  f"or None; {wrong} is not an int")):
        ts.PDrop(budget=64, layers=layers)


@pytest.mark.parametrize("layers", ["8,16,24", 8], ids=repr)
def test_pdrop_layers_must_be_a_sequence(layers):
    with pytest.raises(TypeError, match=re.escape("layers must be a tuple of decoder layer indices such as (8, 16, 24), "
                                                  "or None, ") + quoted(layers)):
        ts.PDrop(budget=64, layers=layers)


# ------------------------------------------------------------------------------- ALVTS holding Selectors
@pytest.fixture(scope="module")
def selectors(model):
    return svd_selectors("llava", model.model.language_model.layers, rank=8)


def test_alvts_with_selectors_compares_and_hashes(model, selectors):
    a = ts.ALVTS(budget=64, selectors=selectors)
    assert a == ts.ALVTS(budget=64, selectors=selectors)
    assert hash(a) == hash(ts.ALVTS(budget=64, selectors=selectors))
    assert a != ts.ALVTS(budget=32, selectors=selectors)
    other = svd_selectors("llava", model.model.language_model.layers, rank=8)
    assert a != ts.ALVTS(budget=64, selectors=other)  # Selectors compare by identity
    assert len({a, ts.ALVTS(budget=64, selectors=selectors)}) == 1


def test_selectors_repr_is_short(selectors):
    text = repr(ts.ALVTS(budget=64, selectors=selectors))
    assert len(text) < 300, text
    fingerprint = selectors.identity["fingerprint"]
    assert (f"selectors=Selectors(layers=0..3 of 4, rank=8, model_type='llava', fingerprint='{fingerprint}')"
            in text), text


# ------------------------------------------------------------------------------- layer ranges in messages
def test_too_small_alvts_budget_from_layer_0_names_no_empty_range():
    with pytest.raises(ValueError, match="every layer processes at least one visual token, a mean of at least 1; "
                                         "raise the budget") as error:
        layer_counts(144, 0.5, 4, 0)
    assert "0..-1" not in str(error.value) and "start_layer" not in str(error.value)


def test_too_small_alvts_budget_from_layer_0_through_compress(model):
    with pytest.raises(ValueError, match="every layer processes at least one visual token") as error:
        ts.compress(model, ts.ALVTS(budget=0.5, start_layer=0, rank=4))
    assert "0..-1" not in str(error.value)


def test_too_small_alvts_budget_after_layer_0_names_layer_0():
    with pytest.raises(ValueError, match=r"when all 144 pass through layer 0 \(a mean of at least 36\.8\): "
                                         "lower start_layer or raise the budget"):
        layer_counts(144, 20, 4, 1)


def test_unreachable_ratio_after_layer_0_names_layer_0():
    with pytest.raises(ValueError, match="every visual token passes through layer 0, a mean of at least 0.250"):
        check_ratio_reachable("FastV", 0.2, 1, 4, "raise the ratio")


def test_unreachable_ratio_names_the_leading_layers():
    with pytest.raises(ValueError, match=r"passes through layers 0\.\.1, a mean of at least 0\.500"):
        check_ratio_reachable("DART", 0.3, 2, 4, "raise the ratio")


@pytest.mark.parametrize("method", [ts.FastV(budget=36.5, layer=1), ts.DART(budget=36.5, layer=1)], ids=repr)
def test_too_small_budget_after_layer_0_names_layer_0(method):
    with pytest.raises(ValueError, match="all 144 pass through layer 0[ ,]") as error:
        method.kept_after(144, 4)
    assert "0..0" not in str(error.value)


@pytest.mark.parametrize("method", [ts.FastV(budget=64), ts.DART(budget=64), ts.ApET(budget=64)], ids=repr)
def test_one_layer_model_names_no_empty_range(method):
    with pytest.raises(ValueError, match="a 1-layer model has no layer after the first to reduce before; this method "
                                         "needs at least 2 decoder layers") as error:
        method.schedule(1)
    assert "[1, 0]" not in str(error.value)


# ------------------------------------------------------------------------------- weights not loaded
@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return tiny_llava("sdpa")


@pytest.mark.parametrize("with_selectors", [False, True], ids=["svd", "given"])
def test_alvts_on_meta_weights_says_load_them(meta_model, selectors, with_selectors):
    method = ts.ALVTS(ratio=0.5, rank=4, selectors=selectors if with_selectors else None)
    with pytest.raises(ValueError, match=r"the model's weights are not loaded: the q/k projections of decoder layers "
                                         r"0\.\.3 are on the meta device .*load the model's weights first"):
        ts.compress(meta_model, method)


def test_svd_selectors_on_meta_weights_says_load_them(meta_model):
    with pytest.raises(ValueError, match="are on the meta device"):
        svd_selectors("llava", meta_model.model.language_model.layers, rank=4)
