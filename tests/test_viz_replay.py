"""The picture of kept tokens and the Replay method (the speed benchmark's oracle)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tokensieve as ts
from tokensieve import viz
from tokensieve.methods.replay import Replay
from tiny import llava_inputs, tiny_llava
from tiny_llava_next import SIZES, anyres_inputs, tiny_anyres

DPI = 100


def panel_pixels(count: int) -> int:
    return round(viz.PANEL_INCHES * count * DPI)


# ---------------------------------------------------------------------------- viz
def test_overlay_has_a_panel_per_stage_plus_input(tmp_path):
    image = Image.new("RGB", (64, 48), (200, 100, 50))
    kept = {"stage1": torch.tensor([0, 5, 10, 11]), "stage2": torch.tensor([5])}
    path = viz.kept_overlay(image, (3, 4), kept, tmp_path / "sub" / "kept.png")
    width, height = Image.open(path).size
    assert (width, height) == (panel_pixels(3), round((viz.PANEL_INCHES + 0.4) * DPI))
    one_stage = viz.kept_overlay(image, (3, 4), {"stage1": kept["stage1"]}, tmp_path / "one.png")
    assert Image.open(one_stage).size[0] == panel_pixels(2)


def test_overlay_rows_stack_methods(tmp_path):
    image = Image.new("RGB", (56, 56), (30, 160, 90))
    rows = [
        ("ApET 32", {"stage1": torch.arange(0, 16, 2), "stage2": torch.tensor([2, 4])}),
        ("other", {"stage1": torch.arange(4)}),
    ]
    path = viz.kept_overlay_rows(image, (4, 4), rows, tmp_path / "rows.png", title="t")
    assert Image.open(path).size == (panel_pixels(3), round((2 * viz.PANEL_INCHES + 0.4) * DPI))


def test_dimmed_darkens_only_dropped_cells():
    image = np.full((4, 6, 3), 0.8, dtype=np.float32)
    keep = viz.kept_grid(torch.tensor([0, 4]), (2, 3))  # cells (0, 0) and (1, 1)
    assert keep.tolist() == [[True, False, False], [False, True, False]]
    out = viz.dimmed(image, keep)
    assert np.allclose(out[:2, :2], 0.8) and np.allclose(out[2:, 2:4], 0.8)
    assert np.allclose(out[:2, 2:], 0.8 * viz.DIM) and np.allclose(out[2:, :2], 0.8 * viz.DIM)


def test_overlay_rejects_indices_outside_the_grid():
    with pytest.raises(ValueError, match="kept indices"):
        viz.kept_grid(torch.tensor([12]), (3, 4))


def test_stage_titles():
    assert viz.stage_title("stage1", 96, 576) == "stage 1: 96 of 576 kept"
    assert viz.stage_title("stage2", 32, 576) == "stage 2: 32 of 576 kept"


# ---------------------------------------------------------------------------- Replay
def run(model, inputs, method):
    with torch.no_grad(), ts.compress(model, method) as handle:
        logits = model(**inputs).logits
    return handle, logits


def assert_same_stats(a, b):
    assert torch.equal(a.tokens_per_layer, b.tokens_per_layer)
    assert len(a.kept) == len(b.kept)
    for kept_a, kept_b in zip(a.kept, b.kept):
        assert kept_a.keys() == kept_b.keys()
        for stage in kept_a:
            assert torch.equal(kept_a[stage], kept_b[stage]), stage


def test_replay_of_apet_keeps_the_same_tokens_at_every_layer():
    model = tiny_llava()
    inputs = llava_inputs(model, [(3, 5), (6, 2)])
    apet, _ = run(model, inputs, ts.ApET(budget=24))
    assert apet.stats.tokens_per_layer.tolist() == [[36, 36, 12, 12]] * 2
    assert not torch.equal(apet.stats.kept[0]["stage1"], apet.stats.kept[1]["stage1"])
    replay = Replay.from_handle(apet)
    with torch.no_grad(), ts.compress(model, replay) as handle:
        for _ in range(2):  # a second forward replays the same selection
            model(**inputs)
            assert_same_stats(handle.stats, apet.stats)


def test_replay_selects_what_it_is_given_without_scoring():
    model = tiny_llava()
    inputs = llava_inputs(model, [(3, 5), (6, 2)])
    apet, apet_logits = run(model, inputs, ts.ApET(budget=24))
    kept = (
        {"stage1": torch.arange(36), "stage2": torch.arange(0, 36, 3)},
        {"stage1": torch.arange(100, 136), "stage2": torch.arange(110, 122)},
    )
    handle, logits = run(model, inputs, Replay(kept=kept, sizes=(144, 144), source=apet.schedule))
    for got, wanted in zip(handle.stats.kept, kept):
        assert torch.equal(got["stage1"], wanted["stage1"]) and torch.equal(got["stage2"], wanted["stage2"])
    assert handle.stats.tokens_per_layer.tolist() == apet.stats.tokens_per_layer.tolist()
    assert not torch.allclose(logits[:, -1], apet_logits[:, -1])


def test_replay_refuses_an_input_it_did_not_record():
    model = tiny_llava()
    inputs = llava_inputs(model, [(3, 5)])
    apet, _ = run(model, inputs, ts.ApET(budget=24))
    recorded = Replay.from_handle(apet)
    other = Replay(kept=recorded.kept, sizes=recorded.sizes, source=ts.ApET(budget=32).schedule(4))
    with pytest.raises(RuntimeError, match="no recorded stage1 selection of 48 out of 144"):
        run(model, inputs, other)


def test_replay_checks_its_records():
    schedule = ts.ApET(budget=24).schedule(4)
    with pytest.raises(ValueError, match="out of range"):
        Replay(kept=({"stage1": torch.tensor([3, 200])},), sizes=(144,), source=schedule)
    with pytest.raises(ValueError, match="stage 1 dropped"):
        Replay(kept=({"stage1": torch.tensor([1, 2]), "stage2": torch.tensor([5])},), sizes=(144,), source=schedule)
    with pytest.raises(ValueError, match="decoder layers"):
        Replay(kept=(), sizes=(), source=schedule).schedule(8)




@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
def test_replay_covers_crops_and_pinned_newlines(kind):
    """AnyRes images are reduced crop by crop around image newlines that are always kept: the replay
    asks for the same per-crop plans and keeps the same tokens at every layer."""
    model = tiny_anyres(kind)
    inputs = anyres_inputs(model, [(3, 5), (1, 7)], SIZES[:2])
    apet, _ = run(model, inputs, ts.ApET(ratio=0.5))
    assert any(item.pinned is not None and bool(item.pinned.any()) for item in apet.stats.items)
    replay = Replay.from_handle(apet)
    with torch.no_grad(), ts.compress(model, replay) as handle:
        for _ in range(2):
            model(**inputs)
            assert_same_stats(handle.stats, apet.stats)
