"""Every method on every family (the registry x the family list), under SDPA and eager attention.

Each cell runs the contract (tests/contract.py) and the paths users take: a second turn on the compressed
cache, a reused handle, a second compress, a copy of a compressed model and a batch with a very
small image. A cell refused by design asserts the error that refuses it.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import tokensieve as ts
from contract import (
    check_attention_implementations, check_batch_equals_rows, check_cache_generation, check_cached_equals_held,
    check_compress_twice, check_copy, check_handle_reuse, check_keep_all, check_second_turn, forward_logits, greedy,
    module_snapshot,
)
from families import FAMILIES, built
from tokensieve import registry

# Each method at a real budget on the tiny models (144 tokens per LLaVA crop, 64 and 80 per Qwen image,
# 4 decoder layers, 6 for Qwen3-VL), with the fields the tiny shapes need.
TINY = {
    "ApET": dict(ratio=0.25, num_basis=2),
    "ALVTS": dict(ratio=0.4, rank=8),  # layer 0 sees all 144: the 3 routed layers share the rest
    "Random": dict(ratio=0.25),
    "DivPrune": dict(ratio=0.25),
    "FastV": dict(ratio=0.6),
    "PDrop": dict(ratio=0.5),
    "DART": dict(ratio=0.6),
    "VisionZip": dict(ratio=0.25),
}
# Cells refused by design: (method, family) -> (the words the error must contain, the fields the error
# names as the fix, with which the cell then runs the contract; None: no fix).
DEEPSTACK = "deepstack layers .* layer=3"  # the tiny Qwen3-VL adds 2 deepstack layers: stages start at 3
REFUSED = {
    ("FastV", "qwen3_vl"): (DEEPSTACK, dict(layer=3)),
    ("PDrop", "qwen3_vl"): (DEEPSTACK, dict(ratio=0.6, layers=(3, 4, 5))),
    ("DART", "qwen3_vl"): (DEEPSTACK, dict(layer=3)),
    ("VisionZip", "llava_onevision"): ("reads the attention of the vision encoder layer", None),
    ("VisionZip", "llava_onevision_video"): ("reads the attention of the vision encoder layer", None),
}
# Cells accepted by `compress` whose method is refused when a video is encoded (its images run; see
# test_family_video.py): (method, family) -> the words the error must contain.
REFUSED_ON_VIDEOS = {
    ("VisionZip", "llava_next_video"): "reads the attention of the vision encoder layer .* pooled",
}
CELLS = [(m, f) for m in registry.method_names() for f in FAMILIES]


def method_of(name: str, **override):
    return registry.method(name, **{**TINY[name], **override})


def cell_id(cell) -> str:
    return f"{cell[0]}-{cell[1]}"


def test_registry_covers_every_exported_method():
    exported = {name for name in ts.__all__ if isinstance(getattr(ts, name), type) and hasattr(getattr(ts, name), "schedule")}
    assert exported - {"Replay"} == set(registry.method_names()) == set(TINY)
    assert registry.entry("apet") is registry.entry("ApET")
    with pytest.raises(ValueError, match="choose among ApET, ALVTS"):
        registry.method("tome", budget=64)


def runnable_method(cell, attn: str = "sdpa"):
    """The cell's method, with the fix its refusal names; None where the cell is refused outright.
    A refused cell first checks the refusal (on the model under `attn`): the error's words, and nothing
    installed."""
    name, family = cell
    if cell in REFUSED_ON_VIDEOS:
        check_refused_on_videos(built(family), FAMILIES[family].batch(built(family)), method_of(name),
                                REFUSED_ON_VIDEOS[cell])
        return None
    if cell not in REFUSED:
        return method_of(name)
    words, fix = REFUSED[cell]
    model = built(family, attn)
    before = module_snapshot(model)
    with pytest.raises(ValueError, match=words):
        ts.compress(model, method_of(name))
    assert module_snapshot(model) == before
    return None if fix is None else method_of(name, **fix)


def check_refused_on_videos(model, batch: dict, method, words: str) -> None:
    """The forward raises the error before any video is encoded, and leaving the block leaves the model
    as it was: no hook, the untouched logits."""
    reference = forward_logits(model, batch)
    before = module_snapshot(model)
    with pytest.raises(ValueError, match=words):
        with ts.compress(model, method):
            forward_logits(model, batch)
    assert module_snapshot(model) == before
    torch.testing.assert_close(forward_logits(model, batch), reference, rtol=0, atol=0)


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_cell(cell):
    run_contract(cell, "sdpa")


def run_contract(cell, attn: str) -> None:
    """The contract of one method x family cell on the family's tiny model under `attn` attention."""
    name, family = cell
    method = runnable_method(cell, attn)
    if method is None:
        return
    case, model = FAMILIES[family], built(family, attn)
    batch = case.batch(model)
    reads_prompt = registry.entry(name).reads_prompt
    check_keep_all(model, batch, dataclasses.replace(method, budget=None, ratio=1.0))
    with ts.compress(model, method) as handle:
        forward_logits(model, batch)
    per_layer, stats = handle.stats.tokens_per_layer, handle.stats
    sizes = torch.zeros(per_layer.shape[0], 1, dtype=torch.long)
    for item, row in zip(stats.items, stats.rows):
        sizes[row] += item.keep.numel()
    assert (per_layer[:, -1:] < sizes).all(), "the method pruned nothing"
    if reads_prompt:
        check_cached_equals_held(model, batch, method)
    else:
        check_cache_generation(model, batch, method, steps=3)
    check_batch_equals_rows(model, batch, case.rows(batch), method, steps=3)
    check_second_turn(model, batch, method, reads_prompt)
    check_handle_reuse(model, batch, method)
    check_compress_twice(model, batch, method)
    check_copy(model, batch, method)


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_cell_eager_equals_sdpa(cell):
    """SDPA and eager attention keep the same tokens and give the same logits and greedy tokens."""
    method = runnable_method(cell)
    if method is None:
        return
    family = cell[1]
    check_attention_implementations(lambda attn: built(family, attn), FAMILIES[family].batch(built(family)), method,
                                    steps=3)


SMALL_CELLS = [(m, f) for m, f in CELLS if FAMILIES[f].small is not None]


@pytest.mark.parametrize("cell", SMALL_CELLS, ids=cell_id)
def test_batch_with_a_very_small_image(cell):
    """A 4-token image beside a 64-token one: no error; each stage keeps the method's minimum of the
    small image where its budget asks for fewer (named in stats.floored); the counts per layer follow
    the schedule; the batch equals each prompt alone."""
    run_small_image(cell, "sdpa")


def run_small_image(cell, attn: str) -> None:
    """`test_batch_with_a_very_small_image` on the family's model under `attn` attention."""
    method = runnable_method(cell, attn)
    if method is None:
        return
    case, model = FAMILIES[cell[1]], built(cell[1], attn)
    batch = case.small(model)
    with ts.compress(model, method) as handle:
        forward_logits(model, batch)
    schedule, items = handle.schedule, handle.stats.items
    expected = torch.tensor([schedule.tokens_per_layer(item.budget_tokens) for item in items])
    assert torch.equal(handle.stats.tokens_per_layer, expected), (handle.stats.tokens_per_layer, expected)
    small = items[1].budget_tokens
    keeps = [schedule.vision_keep] + [stage.keep for stage in schedule.stages]
    if schedule.routing is not None:
        keeps += [lambda n, layer=layer: schedule.routing.keep(layer, n)
                  for layer in range(schedule.routing.start_layer, schedule.num_layers)]
    wanted = [schedule.asked(keep, small, small) for keep in keeps]
    assert bool(handle.stats.floored[1]) == any(k < min(small, schedule.min_keep) for k in wanted)
    assert handle.stats.floored[0] == []
    check_batch_equals_rows(model, batch, case.rows(batch), method, steps=2)


def test_apet_small_image_keeps_its_minimum():
    """The reported case: ApET at ratio 0.2 on a Qwen2.5-VL batch with a small image ran into an error
    inside generate; now the small image keeps num_basis + 1 tokens at each stage."""
    model = built("qwen2_5_vl")
    batch = FAMILIES["qwen2_5_vl"].small(model)
    with ts.compress(model, ts.ApET(ratio=0.2, num_basis=2)) as handle:
        greedy(model, batch, 2)
    assert handle.stats.floored == [[], ["stage1", "stage2"]]
    assert handle.stats.tokens_per_layer[1].tolist() == [3] * 4
