"""tokensieve as an lmms-eval model, through lmms-eval's real command line, offline.

`tokensieve eval` runs `python -m lmms_eval --model tokensieve` on the local task `tokensieve_scenes`
(the small VLM's first 40 held-out test questions) uncompressed and with ApET at 64, in batches of 7
(the last batch holds 5). lmms-eval's own results files are read back and each run's accuracy must
EQUAL `tokensieve bench accuracy`'s on the same questions (another harness: its own prompts, one
forward per batch of 50, argmax instead of generate), with the same visual tokens per layer and the
same decoder FLOPs. Two processes (torchrun; accelerate's launcher starts one process on a CPU) must
give the numbers of one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cli_refusal import refusal
from tokensieve.bench import accuracy as bench
from tokensieve.integrations.lmms_eval import TASKS_DIR, evaluate, scenes_task
from tokensieve.integrations.lmms_eval import settings as S
from tokensieve.smallvlm import CHECKPOINT

QUESTIONS = 40
TASK = "tokensieve_scenes"


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No network, a private HF cache, one thread per process; restored afterwards."""
    values = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "HF_HOME": str(tmp_path_factory.mktemp("hf")), "OMP_NUM_THREADS": "1"}
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def evaluated(offline, tmp_path_factory):
    """`tokensieve eval` on the small VLM: (its output folder, its records)."""
    from tokensieve import cli

    out = tmp_path_factory.mktemp("eval")
    status = cli.main(["eval", "--model", str(CHECKPOINT), "--tasks", TASK, "--methods", "apet", "--budgets", "64",
                       "--limit", str(QUESTIONS), "--batch-size", "7", "--dtype", "float32", "--out", str(out)])
    assert status == 0
    return out, json.loads((out / "eval.json").read_text())


@pytest.fixture(scope="module")
def reference():
    """`tokensieve bench accuracy` on the same questions: {method: Record}."""
    records, skipped = bench.run_accuracy(CHECKPOINT, methods=("ApET",), budgets=(64,), limit=QUESTIONS, progress=False)
    assert skipped == []
    return {r.method: r for r in records}


def lmms_eval_accuracy(folder: Path) -> tuple[float, int]:
    """(exact match, documents) from the results file lmms-eval wrote under folder."""
    (results_file,) = folder.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    return results["results"][TASK]["exact_match,none"], results["n-samples"][TASK]["effective"]


@pytest.mark.parametrize("run, method", [("full", "full"), ("ApET_64", "ApET")])
def test_lmms_eval_accuracy_equals_bench_accuracy(evaluated, reference, run, method):
    out, _ = evaluated
    accuracy, documents = lmms_eval_accuracy(out / run)
    assert documents == QUESTIONS
    assert accuracy == reference[method].accuracy
    stats = json.loads((out / run / "tokensieve_stats.json").read_text())["tasks"][TASK]
    assert stats["prompts"] == QUESTIONS
    assert stats["mean_visual_tokens_per_layer"] == pytest.approx(reference[method].mean_tokens_per_layer)
    model, _, _ = bench.load_checkpoint(CHECKPOINT)
    decoder_and_selection = reference[method].prefill_flops - bench.vision_flops(model.config)
    assert stats["prefill_flops"] == pytest.approx(decoder_and_selection, rel=1e-9)


def test_eval_reports_retention_against_the_uncompressed_run(evaluated, reference, capsys):
    _, records = evaluated
    assert [(r["method"], r["budget"], r["task"]) for r in records] == [("full", None, TASK), ("ApET", 64, TASK)]
    full, apet = records
    assert apet["retention"] == pytest.approx(reference["ApET"].accuracy / reference["full"].accuracy)
    assert (full["mean_visual_tokens_per_layer"], apet["mean_visual_tokens_per_layer"]) == (576.0, 64.0)
    assert apet["prefill_flops"] < full["prefill_flops"] / 5


def test_two_processes_give_the_numbers_of_one(evaluated, tmp_path):
    out, records = evaluated
    (run,) = [r for r in evaluate.plan_runs(str(CHECKPOINT), ["apet"], [64], {}, {"dtype": "float32"}, tmp_path)
              if r.budget == 64]
    evaluate.execute(run, evaluate.command(run, [TASK], [], QUESTIONS, batch_size=7, num_processes=2))
    assert lmms_eval_accuracy(run.folder) == lmms_eval_accuracy(out / "ApET_64")
    two = json.loads((run.folder / "tokensieve_stats.json").read_text())["tasks"][TASK]
    one = json.loads((out / "ApET_64" / "tokensieve_stats.json").read_text())["tasks"][TASK]
    assert two == pytest.approx(one, rel=1e-12)


def test_the_task_file_holds_the_generators_test_questions_in_order():
    lines = (TASKS_DIR / TASK / "questions.jsonl").read_text().splitlines()
    assert len(lines) == scenes_task.QUESTIONS
    assert [json.loads(line) for line in lines[:100]] == scenes_task.question_records(100)
    bench_questions = [(s.question, s.answer) for s in bench.S.split_samples("test", 100)]
    assert [(json.loads(line)["question"], json.loads(line)["answer"]) for line in lines[:100]] == bench_questions


def test_a_document_that_disagrees_with_the_generator_is_refused():
    doc = json.loads((TASKS_DIR / TASK / "questions.jsonl").read_text().splitlines()[0])
    assert scenes_task.image_of(doc).size == (192, 192)
    with pytest.raises(ValueError, match="rewrite it"):
        scenes_task.image_of({**doc, "answer": "nothing"})


# ---------------------------------------------------------------- bad input, before any weights

@pytest.fixture
def config_only(tmp_path):
    """A folder with the small VLM's config.json and no weights: loading weights from it would fail."""
    folder = tmp_path / "config_only"
    folder.mkdir()
    (folder / "config.json").write_text((CHECKPOINT / "config.json").read_text())
    return folder


def test_unknown_method_lists_the_registry_before_weights(config_only):
    from tokensieve.integrations.lmms_eval.model import TokenSieve

    with pytest.raises(ValueError, match=r"unknown method 'fastest'; choose among none \(uncompressed\), ApET, ALVTS"):
        TokenSieve(pretrained=str(config_only), method="fastest", budget=64)


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    folder = tmp_path / "paligemma"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    with pytest.raises(ValueError, match="model_type 'paligemma'.*supported model_types: llava, llava_next, "
                                         "llava_onevision, video_llava, llava_next_video, qwen2_vl, qwen2_5_vl, qwen3_vl"):
        S.resolve(str(folder), "apet", {"budget": 64})
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'.*supported model_types"):
        S.resolve(str(folder), "none", {})


@pytest.mark.parametrize("pretrained, message", [("missing/folder/model", "checkpoint folder missing/folder/model does "
                                                                         "not exist"),
                                                 ("./model", "checkpoint folder ./model does not exist")])
def test_a_missing_checkpoint_folder_says_so(pretrained, message):
    with pytest.raises(ValueError, match=message):
        S.resolve(pretrained, "apet", {"budget": 64})


def test_method_fields_are_checked_before_weights(config_only):
    from tokensieve.integrations.lmms_eval.model import TokenSieve

    with pytest.raises(ValueError, match="ApET has no field stages; its fields: budget, ratio"):
        TokenSieve(pretrained=str(config_only), method="apet", stages=2)
    with pytest.raises(ValueError, match="method=none .* takes no method fields; got budget"):
        TokenSieve(pretrained=str(config_only), method="none", budget=64)
    with pytest.raises(ValueError, match="ApET: layer must be"):
        TokenSieve(pretrained=str(config_only), method="apet", budget=64, layer="middle")
    with pytest.raises(ValueError, match="attn_implementation='flex_attention' is not supported"):
        TokenSieve(pretrained=str(config_only), method="apet", budget=64, attn_implementation="flex_attention")
    selectors = S.resolve(str(CHECKPOINT), "alvts", {"budget": 64}).method.selectors
    assert Path(selectors) == CHECKPOINT / "alvts_selectors.safetensors"


def test_eval_refuses_bad_input_before_any_run(capsys, tmp_path):
    out = tmp_path / "out"
    base = ["eval", "--model", str(CHECKPOINT), "--tasks", TASK, "--out", str(out)]
    assert "unknown method 'fastest'" in refusal(base + ["--methods", "fastest"], capsys)
    assert "does not exist" in refusal(["eval", "--model", str(tmp_path / "none"), "--tasks", TASK], capsys)
    assert "not METHOD:FIELD=VALUE" in refusal(base + ["--method-args", "alvts"], capsys)
    assert "--methods does not run" in refusal(base + ["--methods", "apet", "--method-args", "alvts:rank=8"], capsys)
    assert not out.exists()


def test_eval_plans_one_run_per_method_and_ratio_kept(tmp_path):
    runs = evaluate.plan_runs(str(CHECKPOINT), ["apet", "ALVTS"], [64], {"alvts": {"start_layer": "0"}},
                              {"dtype": "float32"}, tmp_path, ratios=[0.2, 0.5])
    assert [r.label for r in runs] == ["full", "ApET ratio 0.2", "ApET ratio 0.5", "ALVTS ratio 0.2", "ALVTS ratio 0.5"]
    assert "method=alvts,ratio=0.5,start_layer=0," in runs[-1].model_args and "budget" not in runs[-1].model_args
    assert runs[-1].folder == tmp_path / "ALVTS_ratio0.5"


@pytest.mark.parametrize("method, fields", [("none", {}), ("apet", {"budget": 64})])
def test_loglikelihood_is_the_answers_loss_under_the_method(method, fields):
    """The tokensieve model's loglikelihood (llava_hf's convention) inside the handle: the loss of the
    answer equals -log p(answer) from one forward of the small VLM on its own prompt (ApET's selection
    reads no text, so the appended answer cannot change it), and the record counts the prefills."""
    import torch
    from lmms_eval.api.instance import Instance

    import tokensieve as ts
    from tokensieve.integrations.lmms_eval.model import TokenSieve
    from tokensieve.smallvlm import model as M

    lm = TokenSieve(pretrained=str(CHECKPOINT), method=method, dtype="float32", **fields)
    docs = [json.loads(line) for line in (TASKS_DIR / TASK / "questions.jsonl").read_text().splitlines()[:3]]
    lm.task_dict = {TASK: {"test": docs}}
    requests = [Instance("loglikelihood", (doc["question"], doc["answer"], lambda d: [scenes_task.image_of(d)], i, TASK,
                                           "test"), idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1})
                for i, doc in enumerate(docs)]
    losses = [loss for loss, _ in lm.loglikelihood(requests)]

    model, processor = M.load(str(CHECKPOINT))
    images = [scenes_task.image_of(doc) for doc in docs]
    inputs = processor(images=images, text=[M.prompt(d["question"]) for d in docs], return_tensors="pt", padding=True)
    method_instance = None if method == "none" else ts.registry.method(method, **fields)
    handle = ts.compress(model, method_instance) if method_instance else None
    try:
        with torch.no_grad():
            logits = model(**inputs, logits_to_keep=1).logits[:, -1].log_softmax(-1)
    finally:
        if handle is not None:
            handle.remove()
    answers = processor.tokenizer.convert_tokens_to_ids([d["answer"] for d in docs])
    assert losses == pytest.approx([-logits[i, a].item() for i, a in enumerate(answers)], rel=1e-4, abs=1e-5)
    recorded = lm.recorder.gathered()[TASK]
    assert recorded.prompts == 3 and recorded.visual_tokens_per_layer / 3 == (576.0 if method == "none" else 64.0)


def test_generate_until_answers_interleaved_tasks_in_request_order():
    """Requests of two tasks, interleaved, in batches of 3 (lmms-eval sorts each task's requests by length):
    every answer comes back at its request's place and equals the small VLM's own greedy answer under
    ApET; each task's record counts its own prompts."""
    from lmms_eval.api.instance import Instance

    import tokensieve as ts
    from tokensieve.integrations.lmms_eval.model import TokenSieve
    from tokensieve.smallvlm import model as M

    lm = TokenSieve(pretrained=str(CHECKPOINT), method="apet", budget=64, dtype="float32", batch_size=3)
    docs = [json.loads(line) for line in (TASKS_DIR / TASK / "questions.jsonl").read_text().splitlines()[:7]]
    lm.task_dict = {"a": {"test": docs}, "b": {"test": docs}}
    order = [("a", 0), ("b", 5), ("a", 1), ("a", 2), ("b", 6), ("a", 3), ("a", 4)]
    options = {"max_new_tokens": 1, "temperature": 0, "do_sample": False}
    requests = [Instance("generate_until", (docs[i]["question"], dict(options), lambda d: [scenes_task.image_of(d)], i,
                                            task, "test"), idx=0, metadata={"task": task, "doc_id": i, "repeats": 1})
                for task, i in order]
    answers = lm.generate_until(requests)

    model, processor = M.load(str(CHECKPOINT))
    with ts.compress(model, ts.ApET(budget=64)):
        expected = M.answer(model, processor, [scenes_task.image_of(d) for d in docs], [d["question"] for d in docs])
    assert answers == [expected[i] for _, i in order]
    recorded = lm.recorder.gathered()
    assert (recorded["a"].prompts, recorded["b"].prompts) == (5, 2)
