"""The demo and the accuracy benchmark on a small VLM saved to a folder (a tiny one: no training)."""
from __future__ import annotations

import json
import runpy
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from PIL import Image

import tokensieve as ts
from tokensieve.bench import accuracy as A
from tokensieve.bench import demo as D
from tokensieve.smallvlm import model as M
from tokensieve.smallvlm import scenes as S
from tokensieve import cli

TINY = M.Sizes(v_hidden=16, v_layers=1, v_heads=2, v_mlp=32, t_hidden=32, t_layers=4, t_heads=2, t_mlp=64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny small-VLM checkpoint (random weights) written the way the training command writes one."""
    path = tmp_path_factory.mktemp("small_vlm")
    model, _, processor = M.build_all(TINY, seed=5)
    M.save(model, processor, str(path))
    return path


def answers_by_hand(path, samples, method=None):
    """Argmax answers of the saved model, one question at a time (no batching, no padding)."""
    model, processor = M.load(str(path))
    out = []
    for s in samples:
        inputs = processor(images=[s.image], text=[M.prompt(s.question)], return_tensors="pt")
        with torch.no_grad():
            if method is None:
                logits = model(**inputs).logits
            else:
                with ts.compress(model, method):
                    logits = model(**inputs).logits
        out.append(processor.tokenizer.convert_ids_to_tokens(int(logits[0, -1].argmax())))
    return out


def test_accuracy_of_full_and_apet_matches_one_question_at_a_time(saved):
    records, skipped = A.run_accuracy(saved, methods=("ApET",), budgets=(64,), limit=10, batch_size=4,
                                      progress=False)
    full, apet = records
    samples = S.split_samples("test", 10)
    for record, method in ((full, None), (apet, ts.ApET(budget=64))):
        answers = answers_by_hand(saved, samples, method)
        right = [a == s.answer for a, s in zip(answers, samples)]
        assert record.accuracy == pytest.approx(sum(right) / 10)
        for kind in S.KINDS:
            mine = [r for r, s in zip(right, samples) if s.kind == kind]
            assert record.accuracy_by_kind[kind] == pytest.approx(sum(mine) / len(mine))
    assert full.method == "full" and full.retention == 1.0 and full.mean_tokens_per_layer == 576
    assert apet.mean_tokens_per_layer == pytest.approx(64, abs=0.5)
    assert apet.retention == pytest.approx(apet.accuracy / full.accuracy) if full.accuracy else True
    assert apet.prefill_flops < full.prefill_flops / 2 and skipped == []


def test_ground_truth_reference_keeps_object_centres_then_object_patches(saved):
    from tokensieve.smallvlm.ground_truth import GroundTruthObjects, object_first_order

    samples = S.split_samples("test", 6)
    model, processor = M.load(str(saved))
    inputs = processor(images=[s.image for s in samples], text=[M.prompt(s.question) for s in samples],
                       return_tensors="pt", padding=True)
    budget = 20
    with ts.compress(model, GroundTruthObjects(budget, tuple(object_first_order(s) for s in samples))) as handle:
        with torch.no_grad():
            model(**inputs)
        kept = [set(record["ground_truth"].tolist()) for record in handle.stats.kept]
    for sample, chosen in zip(samples, kept):
        owner, anchor = sample.labels[5].reshape(-1), sample.labels[4].reshape(-1)
        centres = {i for i in range(576) if anchor[i] == 1}
        objects = {i for i in range(576) if owner[i] >= 0}
        assert len(chosen) == budget and centres <= chosen  # every scene has fewer than 20 objects
        assert chosen <= objects | centres or objects | centres <= chosen  # background only once objects are all in
    with pytest.raises(ValueError, match="fewer images"):
        with ts.compress(model, GroundTruthObjects(budget, ())):
            model(**inputs)
    orders = tuple(object_first_order(s) for s in samples)
    with ts.compress(model, GroundTruthObjects(budget, orders, two_stage=True)) as handle:  # 30, then 10 after layer 2
        with torch.no_grad():
            model(**inputs)
        for order, record in zip(orders, handle.stats.kept):
            assert set(record["ground_truth"].tolist()) == set(order[:30].tolist())
            assert set(record["ground_truth_stage2"].tolist()) == set(order[:10].tolist())
        assert float(handle.stats.mean_tokens_per_layer[0]) == pytest.approx(budget)


def test_routed_ground_truth_takes_each_images_first_patches_at_every_routed_layer(saved):
    from tokensieve.methods.alvts import layer_counts
    from tokensieve.smallvlm.ground_truth import GroundTruthRouted, object_first_order

    samples = S.split_samples("test", 5)
    model, processor = M.load(str(saved))
    inputs = processor(images=[s.image for s in samples], text=[M.prompt(s.question) for s in samples],
                       return_tensors="pt", padding=True)
    layers, budget = model.config.text_config.num_hidden_layers, 200
    counts = layer_counts(576, budget, layers, start_layer=1)  # 576 at layer 0, the rest share what is left
    orders = tuple(object_first_order(s) for s in samples)
    with ts.compress(model, GroundTruthRouted(budget, orders)) as handle:
        with torch.no_grad():
            model(**inputs)
        for order, record in zip(orders, handle.stats.kept):
            for layer in range(1, layers):
                assert set(record[f"layer{layer}"].tolist()) == set(order[:counts[layer]].tolist())
        assert float(handle.stats.mean_tokens_per_layer[0]) == pytest.approx(budget)
    with pytest.raises(ValueError, match="fewer images"):
        with ts.compress(model, GroundTruthRouted(budget, orders[:2])):
            model(**inputs)


def test_answer_attention_of_a_padded_batch_equals_each_question_alone(saved):
    from tokensieve.bench import alvts_v2v as V
    from tokensieve.bench.accuracy import prepare

    model, processor = M.load(str(saved), attn_implementation="eager")
    samples = S.split_samples("test", 6)
    assert len({len(processor.tokenizer(M.prompt(s.question)).input_ids) for s in samples}) > 1  # padding happens
    evidence = V.evidence_masks(samples)
    batched = V.answer_attention(model, prepare(processor, samples, 3), evidence)  # two batches
    alone = [V.answer_attention(model, prepare(processor, [s], 1), evidence[n:n + 1]) for n, s in enumerate(samples)]
    for field in ("image", "evidence", "first_rows"):
        expected = np.mean([getattr(r, field) for r in alone], 0)
        np.testing.assert_allclose(getattr(batched, field), expected, atol=1e-5)
    assert batched.image.shape == (TINY.t_layers,)
    assert np.all(batched.evidence <= batched.image + 1e-6) and np.all(batched.image <= 1 + 1e-6)
    assert np.all(batched.first_rows <= batched.image + 1e-6)


def test_unreachable_budgets_fall_back_or_are_skipped_with_the_reason(saved):
    records, skipped = A.run_accuracy(saved, methods=("FastV", "DART"), budgets=(32,), limit=5, progress=False)
    fastv = records[1]
    assert fastv.method == "FastV" and "kept=32" in fastv.setting
    assert fastv.mean_tokens_per_layer == pytest.approx((576 + 3 * 32) / 4)  # 4 layers, cut before layer 1
    assert len(skipped) == 1 and skipped[0].startswith("DART 32") and "raise the budget" in skipped[0]


def test_bad_arguments_are_refused_before_anything_runs(saved, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        A.run_accuracy(saved, methods=("FastW",))
    with pytest.raises(ValueError, match="no small VLM"):
        A.run_accuracy(tmp_path)
    with pytest.raises(ValueError, match="give --model local or context or a folder"):
        A.run_accuracy("contxt")  # a misspelt short name is a folder that does not exist


def test_short_model_names_name_the_shipped_folders(saved):
    from tokensieve.smallvlm import CHECKPOINT, CHECKPOINT_CONTEXT, checkpoint_folder

    assert checkpoint_folder(None) == checkpoint_folder("local") == CHECKPOINT
    assert checkpoint_folder("context") == CHECKPOINT_CONTEXT != CHECKPOINT
    assert checkpoint_folder(str(saved)) == saved


def test_cli_accuracy_writes_table_plot_and_json(saved, tmp_path, capsys):
    out_json, out_png = tmp_path / "acc.json", tmp_path / "acc.png"
    code = cli.main(["bench", "accuracy", "--model", str(saved), "--methods", "ApET", "Random", "--budgets", "128",
                     "--limit", "5", "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| full | 576 |" in text and "| ApET | 128 |" in text and "| Random | 128 |" in text
    records = json.loads(out_json.read_text())
    assert [r["method"] for r in records] == ["full", "ApET", "Random"]
    for key in ("method", "budget", "accuracy", "retention", "mean_tokens_per_layer", "prefill_flops"):
        assert all(key in r for r in records)
    assert Image.open(out_png).size[0] > 600


def test_demo_answers_with_every_method_and_draws_their_kept_tokens(saved, tmp_path):
    lines = []
    runs = D.run_demo(saved, budget=64, scenes=2, out=tmp_path / "kept.png", echo=lines.append)
    labels = [r.label for r in runs]
    assert labels[0] == "full" and {f"{m} 64" for m in ("ApET", "ALVTS", "Random", "DivPrune")} <= set(labels)
    asked = D.demo_questions(2, 0)
    assert len(asked) == 4 and asked[0].scene == asked[1].scene == 1
    by_hand = answers_by_hand(saved, [S.Sample(0, a.image, a.question.text, a.question.answer, a.question.kind,
                                               None, None) for a in asked])
    assert runs[0].answers == by_hand
    apet = runs[labels.index("ApET 64")]
    assert set(apet.kept) == {"stage1", "stage2"} and apet.tokens_per_layer == pytest.approx(64, abs=0.5)
    text = "\n".join(lines)
    assert asked[0].question.text in text and "prefill ms" in text
    assert "skipped DART: " in text and "raise the budget" in text  # 64 is out of DART's reach on 4 layers
    assert Image.open(tmp_path / "kept.png").size[1] > 300


def test_demo_refuses_a_bad_budget_before_loading(tmp_path):
    with pytest.raises(ValueError, match="budget must be between"):
        D.run_demo(tmp_path / "nothing", budget=1000)


def test_cli_runs_as_a_module_and_as_the_console_script(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tokensieve", "demo", "--help"])
    monkeypatch.delitem(sys.modules, "tokensieve.cli")  # as a fresh `python -m` would find it
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("tokensieve.cli", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--budget", "--scenes", "--out", "--threads"))
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["tokensieve"] == "tokensieve.cli:main"


def test_cli_reports_a_bad_budget(capsys):
    assert cli.main(["demo", "--budget", "1000"]) == 2
    assert "budget must be between" in capsys.readouterr().err


def test_shipped_checkpoint_loads_offline_and_answers():
    """The committed small VLM: fp16 weights under 20 MB, its selectors match it, it meets its target on
    the benchmark's 1000 held-out questions (95% overall, above 85% on every kind), and compression
    ranks as measured: ApET and ALVTS at 64 tokens far above a random 64 (first 100 questions)."""
    files = list(A.CHECKPOINT.iterdir())
    assert sum(f.stat().st_size for f in files) < 20e6
    (full,), _ = A.run_accuracy(A.CHECKPOINT, methods=(), limit=1000, progress=False)
    assert full.accuracy >= 0.95 and min(full.accuracy_by_kind.values()) > 0.85, full
    records, skipped = A.run_accuracy(A.CHECKPOINT, methods=("ApET", "ALVTS", "Random"), budgets=(64,), limit=100,
                                      progress=False)
    _, apet, alvts, random = records
    assert skipped == [] and "SVD" not in alvts.setting
    assert min(apet.accuracy, alvts.accuracy) > random.accuracy + 0.25, (apet.accuracy, alvts.accuracy, random.accuracy)


def test_context_checkpoint_loads_offline_and_meets_its_targets():
    """The second small VLM (`--model context`): fp16 weights under 20 MB, its selectors match it, it
    answers at least 95% of the benchmark's 1000 held-out questions (above 85% on every kind), every
    method reaches a mean of 64 on its 20 layers, and the ground-truth object patches at 64 keep at
    least 90% of 100 questions (see the README for the figure on 1000)."""
    from tokensieve.smallvlm import CHECKPOINT_CONTEXT

    assert sum(f.stat().st_size for f in CHECKPOINT_CONTEXT.iterdir()) < 20e6
    (full,), _ = A.run_accuracy("context", methods=(), limit=1000, progress=False)
    assert full.accuracy >= 0.95 and min(full.accuracy_by_kind.values()) > 0.85, full
    records, skipped = A.run_accuracy("context", budgets=(64,), limit=20, progress=False)
    reached = {r.method: r for r in records[1:]}
    assert skipped == [] and "SVD" not in reached["ALVTS"].setting
    assert all(r.mean_tokens_per_layer == pytest.approx(64, abs=0.5) for r in reached.values()), reached
    (_, truth), _ = A.run_accuracy("context", methods=("GroundTruth",), budgets=(64,), limit=100, progress=False)
    assert truth.retention >= 0.90, truth
