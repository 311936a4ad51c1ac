"""The lmms-eval model on Qwen-VL checkpoints and on videos, against tokensieve's own API.

Tiny random-weight checkpoints (tiny_checkpoints.py) and generated video files. Each test runs the
lmms-eval model's `generate_until` on three documents in batches of two (so a batch with an odd item;
with videos of 10, 6 and 3 frames read at up to 4, so frame counts mixed where the family allows, and
split into batches of one frame count where it does not), uncompressed and with ApET, and compares its
greedy answers and its record with `tokensieve.compress` + `generate` on each document alone, from the
same processor. The processor itself is checked against transformers' PIL image processors, frame by
frame. One run goes through lmms-eval's command line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoModelForImageTextToText

import tiny_checkpoints as T
import tokensieve as ts
from tokensieve.integrations.lmms_eval import settings as S
from tokensieve.integrations.lmms_eval.media import load_visuals
from tokensieve.integrations.lmms_eval.processors import load_processor
from tokensieve.integrations.lmms_eval.prompts import QWEN_SYSTEM_PROMPT, model_inputs
from tokensieve.integrations.lmms_eval.recording import placeholder_mask
from tokensieve.smallvlm import CHECKPOINT

FRAMES = 4  # max_frames_num: the videos below give 4, 4 and 3 frames
BUDGET = 24  # ApET's visual tokens per image, or per frame of a video
# lmms-eval's collator orders requests longest first: the first batch holds documents 0 and 2 (videos of 4 and
# 3 frames), the second document 1 alone.
QUESTIONS = ["what color is the cube", "how many", "where is the ball"]
OPTIONS = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": ["</s>"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_lmms")


@pytest.fixture(scope="module")
def videos(folder):
    return [str(T.write_video(folder / f"clip{i}.mp4", frames, seed=i)) for i, frames in enumerate((10, 6, 3))]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    sizes = ((40, 30, 3), (24, 24, 3), (20, 44, 3))
    return [PIL.Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for size in sizes]


@pytest.fixture(scope="module")
def checkpoint(folder):
    made = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            target = folder / model_type
            target.mkdir()
            build = T.qwen_checkpoint if model_type in S.QWEN_MODEL_TYPES else T.llava_video_checkpoint
            made[model_type] = build(model_type, target)
        return made[model_type]

    return make


def requests(docs: list[dict], task: str = "tiny"):
    from lmms_eval.api.instance import Instance

    return [Instance("generate_until", (doc["question"], dict(OPTIONS), lambda d: [d["visual"]], i, task, "test"), idx=0,
                     metadata={"task": task, "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]


def lmms_model(path: Path, method: str, **arguments):
    from tokensieve.integrations.lmms_eval.model import TokenSieve

    fields = {"budget": BUDGET} if method == "apet" else {}
    return TokenSieve(pretrained=str(path), method=method, dtype="float32", batch_size=2, max_frames_num=FRAMES,
                      **fields, **arguments)


def reference(path: Path, model_type: str, method: str, docs: list[dict]) -> tuple[list[str], list[float]]:
    """Each document alone through the checkpoint, untouched or inside `ts.compress(ApET)`: greedy answers and
    the visual tokens per layer (placeholders when untouched, `handle.stats` when compressed)."""
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    processor = load_processor(str(path), model_type, {})
    qwen = model_type in S.QWEN_MODEL_TYPES
    answers, tokens = [], []
    for doc in docs:
        inputs = model_inputs(processor, qwen, [doc["question"]], [load_visuals([doc["visual"]], FRAMES)], None,
                              QWEN_SYSTEM_PROMPT)
        handle = ts.compress(model, ts.ApET(budget=BUDGET)) if method == "apet" else None
        try:
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=OPTIONS["max_new_tokens"], do_sample=False,
                                        pad_token_id=processor.tokenizer.eos_token_id,
                                        eos_token_id=processor.tokenizer.eos_token_id)
            tokens.append(float(handle.stats.mean_tokens_per_layer[0]) if handle
                          else float(placeholder_mask(model.config, inputs["input_ids"]).sum()))
        finally:
            if handle is not None:
                handle.remove()
        text = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.append(text.split("</s>")[0])
    return answers, tokens


CASES = [("qwen2_5_vl", "image"), ("qwen2_vl", "video"), ("qwen2_5_vl", "video"), ("qwen3_vl", "video"),
         ("video_llava", "video"), ("llava_next_video", "video"), ("llava_onevision", "video")]


@pytest.mark.parametrize("method", ["none", "apet"])
@pytest.mark.parametrize("model_type, kind", CASES)
def test_answers_and_tokens_equal_tokensieve_alone(checkpoint, videos, images, model_type, kind, method):
    path = checkpoint(model_type)
    visuals = videos if kind == "video" else images
    docs = [{"question": q, "visual": v} for q, v in zip(QUESTIONS, visuals)]
    lm = lmms_model(path, method)
    lm.task_dict = {"tiny": {"test": docs}}
    prefills = []
    hook = lm.model.register_forward_hook(lambda m, a, k, o: prefills.append(k["input_ids"].shape)
                                          if k["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    answers = lm.generate_until(requests(docs))
    hook.remove()
    # batches of 2 then 1; the LLaVA families split the first by frame count (4 and 3), Qwen-VL takes it whole
    split = kind == "video" and model_type not in S.QWEN_MODEL_TYPES
    assert [shape[0] for shape in prefills] == ([1, 1, 1] if split else [2, 1])
    expected, tokens = reference(path, model_type, method, docs)
    assert answers == expected
    assert any(answers)  # words, not only special tokens
    recorded = lm.recorder.gathered()["tiny"]
    assert recorded.prompts == 3
    assert recorded.visual_tokens_per_layer == pytest.approx(sum(tokens))
    if method == "apet" and kind == "video":  # every frame above the budget: the budget per frame
        frames = [min(FRAMES, n) for n in (10, 6, 3)]
        assert recorded.visual_tokens_per_layer <= BUDGET * sum(frames) + 3 * FRAMES


# ---------------------------------------------------------------- the processors, frame by frame

def test_qwen_video_patches_equal_the_image_processors_for_a_still_clip(checkpoint):
    """Two identical frames (one temporal patch) must give the PIL image processor's patches of that frame,
    which repeats an image over the temporal patch, when both resize to the same size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = load_processor(str(checkpoint("qwen2_5_vl")), "qwen2_5_vl", {})
    frame = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    video = processor.video_processor([np.stack([frame, frame])], return_tensors="pt")
    limits = T.QWEN_VIDEO_PIXELS
    image = Qwen2VLImageProcessorPil(patch_size=2, merge_size=2, temporal_patch_size=2, min_pixels=limits["shortest_edge"],
                                     max_pixels=limits["longest_edge"])(PIL.Image.fromarray(frame), return_tensors="pt")
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist()
    torch.testing.assert_close(video["pixel_values_videos"], image["pixel_values"], atol=1e-5, rtol=0)


def test_qwen_video_limits_as_transformers_reads_a_hub_checkpoint(tmp_path):
    """A Qwen2.5-VL checkpoint with only preprocessor_config.json (as on the hub): its min_pixels and max_pixels
    set the video frames' limits too, as Qwen2-VL's video processor reads them."""
    from tokensieve.integrations.lmms_eval.processors import video_settings

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056,
                                                                   "patch_size": 14, "merge_size": 2}))
    settings = video_settings(str(tmp_path), "qwen2_5_vl", {})
    assert settings["size"] == {"shortest_edge": 3136, "longest_edge": 12845056}
    assert video_settings(str(tmp_path / "none"), "qwen2_5_vl", {})["size"] == {"shortest_edge": 128 * 28 * 28,
                                                                                 "longest_edge": 28 * 28 * 768}


@pytest.mark.parametrize("model_type, size, crop", [("video_llava", {"shortest_edge": 24}, True),
                                                    ("llava_next_video", {"shortest_edge": 48}, True),
                                                    ("llava_onevision", {"height": 48, "width": 48}, False)])
def test_llava_video_frames_equal_the_image_processors(checkpoint, model_type, size, crop):
    """Each frame of a LLaVA-family video is transformers' PIL image processor's output for that frame with
    the checkpoint's video settings."""
    from transformers import CLIPImageProcessorPil

    processor = load_processor(str(checkpoint(model_type)), model_type, {})
    clip = np.random.default_rng(2).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    frames = processor.video_processor([clip], return_tensors="pt")["pixel_values_videos"][0]
    side = size.get("shortest_edge", 48)
    as_images = CLIPImageProcessorPil(size=size, do_center_crop=crop, crop_size={"height": side, "width": side})
    expected = as_images([PIL.Image.fromarray(f) for f in clip], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(frames, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- refusals

def test_a_video_on_a_family_without_videos_is_refused_before_generation(videos):
    from tokensieve.integrations.lmms_eval.model import TokenSieve

    lm = TokenSieve(pretrained=str(CHECKPOINT), method="none", dtype="float32")
    docs = [{"question": "what color", "visual": videos[0]}]
    lm.task_dict = {"tiny": {"test": docs}}
    calls = []
    lm.model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="llava checkpoints take images only; the model types that take videos: "
                                         "llava_onevision, video_llava, llava_next_video, qwen2_vl"):
        lm.generate_until(requests(docs))
    assert calls == []


@pytest.mark.parametrize("arguments, message", [
    ({"min_pixels": 3136}, "min_pixels set the image resolution of Qwen-VL checkpoints .* this checkpoint is llava"),
    ({"max_frames_num": 0}, "max_frames_num must be a positive integer, got 0"),
    ({"max_pixels": "many"}, "max_pixels must be a positive integer"),
])
def test_bad_video_and_resolution_arguments_are_refused_before_weights(tmp_path, arguments, message):
    from tokensieve.integrations.lmms_eval.model import TokenSieve

    (tmp_path / "config.json").write_text((CHECKPOINT / "config.json").read_text())  # no weights to load
    with pytest.raises(ValueError, match=message):
        TokenSieve(pretrained=str(tmp_path), method="none", **arguments)


def test_qwen_limits_are_checked_and_reach_the_image_processor(checkpoint):
    path = checkpoint("qwen2_5_vl")
    with pytest.raises(ValueError, match="min_pixels=4096 is above max_pixels=1024"):
        S.image_options("qwen2_5_vl", 8, 4096, 1024)
    processor = load_processor(str(path), "qwen2_5_vl", S.image_options("qwen2_5_vl", 8, 16, 64))
    assert (processor.image_processor.size["shortest_edge"], processor.image_processor.size["longest_edge"]) == (16, 64)


def test_qwen_has_no_loglikelihood(checkpoint):
    lm = lmms_model(checkpoint("qwen2_5_vl"), "none")
    with pytest.raises(NotImplementedError, match="LLaVA families only"):
        lm.loglikelihood([])


# ---------------------------------------------------------------- lmms-eval's command line

TASK_YAML = """task: tiny_videos
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
  until: ["</s>"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = '''def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


def test_lmms_eval_command_line_on_a_video_task(checkpoint, videos, tmp_path):
    """`python -m lmms_eval --model tokensieve` on a local video task, LLaVA-NeXT-Video with ApET: the answers
    lmms-eval logs, and its exact match, equal tokensieve's own on each document alone."""
    path = checkpoint("llava_next_video")
    docs = [{"question": q, "visual": v} for q, v in zip(QUESTIONS, videos)]
    expected, _ = reference(path, "llava_next_video", "apet", docs)
    answers = [expected[0], "no such answer", expected[2]]
    tasks = tmp_path / "tasks" / "tiny_videos"
    tasks.mkdir(parents=True)
    data = tmp_path / "videos.jsonl"
    data.write_text("".join(json.dumps({"question": q, "video": v, "answer": a}) + "\n"
                            for q, v, a in zip(QUESTIONS, videos, answers)))
    (tasks / "tiny_videos.yaml").write_text(TASK_YAML.format(data=data))
    (tasks / "utils.py").write_text(TASK_UTILS)
    out = tmp_path / "out"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    model_args = f"pretrained={path},method=apet,budget={BUDGET},dtype=float32,max_frames_num={FRAMES}"
    subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "tokensieve", "--model_args", model_args,
                    "--tasks", "tiny_videos", "--include_path", str(tmp_path / "tasks"), "--batch_size", "2",
                    "--output_path", str(out), "--log_samples"], env=environment, check=True, timeout=600,
                   capture_output=True)
    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["results"]["tiny_videos"]["exact_match,none"] == pytest.approx(2 / 3)
    (samples_file,) = out.rglob("*_samples_tiny_videos.jsonl")
    logged = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    responses = [s["filtered_resps"] for s in logged]  # lmms-eval unwraps a single response
    assert [r[0] if isinstance(r, list) else r for r in responses] == expected
