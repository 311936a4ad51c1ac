"""No method makes the host wait for the device inside a decoder layer.

Reads back (a scalar, a data-dependent shape) are counted on the CPU with `host_reads`, strictly: what
a GPU run would keep on the host counts too. The padded two-row batch makes every mask non-trivial.
"""
from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve import registry
from host_reads import HostReads, reads_inside
from tiny_llava_next import SIZES, anyres_inputs, tiny_anyres
from tiny_qwen import build_inputs, tiny_qwen
from tokensieve.runtime.compat import CACHE_ARGUMENT

METHODS = {
    "ApET": ts.ApET(budget=32),
    "ALVTS": ts.ALVTS(ratio=64 / 576, start_layer=0, rank=8),
    "FastV": ts.FastV(budget=80),
    "PDrop": ts.PDrop(budget=80),
    "DART": ts.DART(budget=80),
    "VisionZip": ts.VisionZip(budget=32),
    "DivPrune": ts.DivPrune(budget=32),
    "Random": ts.Random(budget=32),
}


def decode_step(batch: dict, out) -> dict:
    mask = batch["attention_mask"]
    return {"input_ids": out.logits[:, -1:].argmax(-1), CACHE_ARGUMENT: out.past_key_values,
            "attention_mask": torch.cat([mask, torch.ones_like(mask[:, :1])], 1)}


@pytest.mark.parametrize("name", METHODS)
def test_decoder_layers_read_nothing_back(model, batch, name):
    """Stages, ALVTS's per-layer selection, masks and scatters queue device work only, at prefill and at
    a decoding step over the cache. DART alone reads one count per image: the text rows after it, which
    set how many text pivots it has."""
    layers = model.model.language_model.layers
    with ts.compress(model, METHODS[name]), torch.no_grad():
        with reads_inside(layers) as prefill:
            out = model(**batch, use_cache=True)
        with reads_inside(layers) as decode:
            model(**decode_step(batch, out), use_cache=True)
    assert dict(decode.sites) == {}
    if name == "DART":
        assert sum(prefill.sites.values()) == 2 and all("dart.py" in site for site in prefill.sites)
    else:
        assert dict(prefill.sites) == {}


def other_family(name: str):
    if name == "llava_next":  # pinned image newlines, an image split over crops
        model = tiny_anyres("llava_next")
        return model, anyres_inputs(model, [(3, 5), (1, 7)], SIZES[:2])
    model = tiny_qwen("qwen2_5_vl")  # a video: one item reduced frame by frame, M-RoPE positions
    return model, build_inputs("qwen2_5_vl", [[3, ("video", (3, 16, 16)), 4]])


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl video"])
@pytest.mark.parametrize("method", [ts.ApET(ratio=0.6), ts.ALVTS(ratio=0.3, start_layer=0, rank=8)], ids=["ApET", "ALVTS"])
def test_other_families_read_nothing_back_in_their_layers(family, method):
    model, inputs = other_family(family)
    with ts.compress(model, method), torch.no_grad(), reads_inside(model.model.language_model.layers) as prefill:
        model(**inputs)
    assert dict(prefill.sites) == {}


def test_the_audit_sees_a_boolean_index_and_a_scalar_read():
    audit = HostReads()
    audit.active = True
    x = torch.arange(6.0)
    with audit:
        x[x > 2].sum()
        int(x.sum())
        x[torch.tensor([1, 2])] * 2  # an integer index has a known shape: not a read
    assert sum(audit.sites.values()) == 2


@pytest.mark.parametrize("name", registry.method_names())
def test_every_method_refuses_right_padding_before_any_layer(model, batch, name):
    right_padded = {**batch, "attention_mask": batch["attention_mask"].clone()}
    right_padded["attention_mask"][0, -1] = 0
    ran = []
    handles = [layer.register_forward_pre_hook(lambda *_: ran.append(1)) for layer in model.model.language_model.layers]
    try:
        method = registry.method(name, budget=80) if name != "ALVTS" else METHODS["ALVTS"]
        with ts.compress(model, method), torch.no_grad(), pytest.raises(ValueError, match="pad on the left"):
            model(**right_padded)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == []
