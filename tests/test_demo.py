"""The demo, its picture of kept tokens, the Replay method it times against, and the CLI."""
from __future__ import annotations

import runpy
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from PIL import Image

import tokensieve as ts
from tokensieve import cli, viz
from tokensieve.demo import DemoConfig, WordVocab, compact_counts, run_demo, scene_image
from tokensieve.methods.replay import Replay
from tiny import llava_inputs, tiny_llava

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
    image = scene_image(56)
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
    other = Replay(kept=recorded.kept, sizes=recorded.sizes, source=ts.ApET(budget=32).schedule(4, {}))
    with pytest.raises(RuntimeError, match="no recorded stage1 selection of 48 out of 144"):
        run(model, inputs, other)


def test_replay_checks_its_records():
    schedule = ts.ApET(budget=24).schedule(4, {})
    with pytest.raises(ValueError, match="out of range"):
        Replay(kept=({"stage1": torch.tensor([3, 200])},), sizes=(144,), source=schedule)
    with pytest.raises(ValueError, match="stage 1 dropped"):
        Replay(kept=({"stage1": torch.tensor([1, 2]), "stage2": torch.tensor([5])},), sizes=(144,), source=schedule)
    with pytest.raises(ValueError, match="decoder layers"):
        Replay(kept=(), sizes=(), source=schedule).schedule(8, {})


# ---------------------------------------------------------------------------- demo and CLI
TINY = DemoConfig(image_size=112, patch=14, vision_layers=1, vision_width=32, text_layers=4, text_width=64)


def test_demo_runs_end_to_end_and_writes_the_picture(tmp_path):
    lines: list[str] = []
    result = run_demo(budgets=(32, 24), repeats=2, out=tmp_path / "kept.png", config=TINY, answer_steps=2,
                      echo=lines.append)
    text = "\n".join(lines)
    assert "RANDOM WEIGHTS" in text and "not meaningful" in text and str(result.path) in text
    assert Image.open(result.path).size == (panel_pixels(3), round((2 * viz.PANEL_INCHES + 0.4) * DPI))
    apet = {e.budget: e for e in result.entries if e.name == "ApET"}
    replay = {e.budget: e for e in result.entries if e.name == "Replay"}
    assert apet[32].tokens_per_layer == [48, 48, 16, 16] and apet[24].tokens_per_layer == [36, 36, 12, 12]
    for budget in (32, 24):
        assert replay[budget].tokens_per_layer == apet[budget].tokens_per_layer
        assert len(apet[budget].times) == len(replay[budget].times) == 2
        assert result.overheads[budget] > 0
    rows = [line.split()[:5] for line in result.table.splitlines()[2:]]
    assert rows == [
        ["full", "-", "64", "-", "64.0"], ["ApET", "32", "48", "16", "32.0"], ["ApET", "24", "36", "12", "24.0"],
    ]
    assert "64x4" in result.table and "48x2 16x2" in result.table and "36x2 12x2" in result.table


def test_demo_checks_budgets_before_building_anything(tmp_path):
    with pytest.raises(ValueError, match="raise the budget"):
        run_demo(budgets=(4,), out=tmp_path / "x.png", config=TINY, echo=lambda line: None)
    assert not (tmp_path / "x.png").exists()


def test_word_vocab_expands_the_image_placeholder():
    vocab = WordVocab()
    ids = vocab.encode("USER: <image>\nWhat is in the image? ASSISTANT:", 5)
    assert int((ids == vocab.image_id).sum()) == 5 and ids[0] == vocab.ids["<s>"]
    assert vocab.decode(ids[-2:].tolist()) == "ASSISTANT :"
    with pytest.raises(ValueError, match="no word"):
        vocab.encode("zebra", 1)


def test_compact_counts():
    assert compact_counts([288, 288, 96, 96, 96]) == "288x2 96x3"


def test_cli_parses_the_demo_flags(monkeypatch):
    seen = {}
    monkeypatch.setattr("tokensieve.demo.run_demo", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["demo", "--budgets", "128", "64", "--repeats", "3", "--out", "x.png"]) == 0
    assert seen["budgets"] == [128, 64] and seen["repeats"] == 3 and seen["out"] == "x.png"
    assert seen["config"] == DemoConfig()


def test_cli_reports_a_bad_budget(capsys):
    assert cli.main(["demo", "--budgets", "4"]) == 2
    assert "raise the budget" in capsys.readouterr().err


def test_cli_runs_as_a_module_and_as_the_console_script(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tokensieve", "demo", "--help"])
    monkeypatch.delitem(sys.modules, "tokensieve.cli")  # as a fresh `python -m` would find it
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("tokensieve.cli", run_name="__main__", alter_sys=True)  # python -m tokensieve.cli
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--budgets", "--repeats", "--out", "--threads"))
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["tokensieve"] == "tokensieve.cli:main"
