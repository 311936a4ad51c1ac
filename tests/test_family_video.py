"""Videos on Video-LLaVA, LLaVA-NeXT-Video, LLaVA-OneVision and Qwen: what the matrix cannot see.

Per-frame counts against each frame's own schedule, stage 1 against the operator applied by hand to
each frame, a frame's CLS token kept by every stage, `budget` meaning tokens per frame, batches of
videos with different frame counts, and VisionZip on LLaVA-NeXT-Video's images.
"""
from __future__ import annotations

import pytest
import torch

import tokensieve as ts

from contract import check_batch_equals_rows, check_cache_generation, forward_logits
from families import FAMILIES, VIDEO_PROMPTS, built
from tiny_llava_next import anyres_inputs, row_inputs as anyres_row
from tiny_qwen import build_inputs, row as qwen_row, tiny_qwen
from tiny_video import video_inputs, video_row

VIDEO_FAMILIES = ("video_llava", "llava_next_video", "llava_onevision_video")
FRAME_TOKENS = 36  # budget tokens of one frame on every tiny video family
PINNED_PER_FRAME = {"video_llava": 1, "llava_next_video": 0, "llava_onevision_video": 0}  # Video-LLaVA's CLS
PINNED_AFTER = {"video_llava": 0, "llava_next_video": 0, "llava_onevision_video": 1}  # OneVision's newline
METHODS = {
    "ApET": ts.ApET(ratio=0.25, num_basis=2),
    "ALVTS": ts.ALVTS(ratio=0.4, rank=8),
    "PDrop": ts.PDrop(ratio=0.5),
    "DivPrune": ts.DivPrune(ratio=0.25),
}


def expected_row_counts(schedule, stats, family: str) -> torch.Tensor:
    """(B, L): per batch row, the sum of each frame's own schedule (36 budget tokens, the same for every
    method), its pinned tokens, and each image's schedule plus its newlines."""
    frames = 3
    rows = torch.zeros(max(stats.rows) + 1, schedule.num_layers, dtype=torch.long)
    per_frame = torch.tensor(schedule.tokens_per_layer(FRAME_TOKENS))
    for item, row in zip(stats.items, stats.rows):
        if item.modality == "video":
            rows[row] += frames * (per_frame + PINNED_PER_FRAME[family]) + PINNED_AFTER[family]
        else:
            pinned = 0 if item.pinned is None else int(item.pinned.sum())
            rows[row] += torch.tensor(schedule.tokens_per_layer(item.budget_tokens)) + pinned
    return rows


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_counts_per_frame_follow_the_schedule(family, name):
    """In a batch mixing an image and a video in one prompt, every layer's visual tokens are each frame's
    own schedule summed (plus the image's); each frame keeps the same count."""
    model, method = built(family), METHODS[name]
    batch = video_inputs(model, VIDEO_PROMPTS, frames=3)
    with ts.compress(model, method) as handle:
        forward_logits(model, batch)
    stats, schedule = handle.stats, handle.schedule
    assert torch.equal(stats.tokens_per_layer, expected_row_counts(schedule, stats, family))
    stages = ["stage1"] * (schedule.vision_plan is not None) + [stage.name for stage in schedule.stages]
    if schedule.routing is not None:
        stages += [f"layer{layer}" for layer in range(schedule.routing.start_layer, schedule.num_layers)]
    for stage in stages:
        wanted = expected_frame_keep(schedule, stage)
        videos = [counts for item, counts in zip(stats.items, stats.kept_per_frame(stage)) if item.modality == "video"]
        assert videos == [[wanted] * 3] * 2, (stage, videos)


def expected_frame_keep(schedule, stage: str) -> int:
    counts = schedule.tokens_per_layer(FRAME_TOKENS)
    if stage == "stage1":
        return counts[0]
    if stage.startswith("layer"):
        return counts[int(stage[5:])]
    return counts[next(s.layer for s in schedule.stages if s.name == stage)]


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision_video"])
def test_mixed_image_and_video_batch_equals_rows(family):
    """NeXT-Video and OneVision (whose matrix batch holds videos only): a prompt with an AnyRes image and a
    video beside a video prompt equals each prompt alone."""
    model = built(family)
    batch = video_inputs(model, VIDEO_PROMPTS, frames=3)
    rows = [video_row(batch, VIDEO_PROMPTS, i) for i in range(2)]
    check_batch_equals_rows(model, batch, rows, ts.ApET(ratio=0.25, num_basis=2), steps=2)


@pytest.mark.parametrize("method", [ts.FastV(ratio=0.6), ts.ALVTS(ratio=0.4, rank=8), ts.Random(ratio=0.25)],
                         ids=lambda m: type(m).__name__)
def test_video_llava_keeps_every_frame_cls(method):
    """Each frame's CLS token (slot 0 of its 37) is kept by every stage and routed layer, and not counted."""
    model = built("video_llava")
    batch = FAMILIES["video_llava"].batch(model)
    with ts.compress(model, method) as handle:
        forward_logits(model, batch)
    cls = torch.arange(3) * 37
    for item, kept in zip(handle.stats.items, handle.stats.kept):
        if item.modality == "video":
            assert item.budget_tokens == 3 * FRAME_TOKENS
            for stage, indices in kept.items():
                assert torch.isin(cls, indices.cpu()).all(), stage


def test_budget_means_tokens_per_frame():
    """`budget` is per frame: ApET(budget=16) keeps 24 of each frame's 36 at stage 1, 8 after layer 2
    (a mean of 16 over the 4 layers), as on an image of 36 tokens."""
    model = built("video_llava")
    batch = FAMILIES["video_llava"].batch(model)
    with ts.compress(model, ts.ApET(budget=16, num_basis=2)) as handle:
        forward_logits(model, batch)
    assert handle.stats.kept_per_frame("stage1") == [[24] * 3, [24], [24] * 3]
    assert handle.stats.kept_per_frame("stage2") == [[8] * 3, [8], [8] * 3]


def language_inputs(model, batch: dict) -> dict:
    """The kwargs the language model receives (the runtime's pre-hooks run first)."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
    try:
        forward_logits(model, batch)
    finally:
        hook.remove()
    return seen[0]


def test_video_llava_stage1_is_the_operator_per_frame():
    """The video rows the language model receives are, per frame, the CLS token projected and ApET's plan
    applied by hand to that frame's 36 patch features of the selected CLIP layer, then projected."""
    model = built("video_llava")
    method = ts.ApET(ratio=0.25, num_basis=2)
    batch = video_inputs(model, [(3, "video", 2)], frames=3)
    schedule = method.schedule(4, "video_llava")
    with torch.no_grad():
        hidden = model.model.video_tower(batch["pixel_values_videos"].flatten(0, 1), output_hidden_states=True)
        frames = hidden.hidden_states[-2]  # (3, 37, D_vision)
        expected = []
        for frame in frames:
            plan = schedule.vision_plan(frame[None, 1:], schedule.vision_keep(FRAME_TOKENS), None)
            expected += [frame[:1], plan.apply(frame[None, 1:])[0]]
        expected = model.model.multi_modal_projector(torch.cat(expected))
    with ts.compress(model, method):
        got = language_inputs(model, batch)["inputs_embeds"][0, 3:-2]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision_video"])
def test_pooled_frames_reduced_after_pooling(family):
    """NeXT-Video and OneVision: each frame's pooled, projected rows reduced by the plan applied by hand
    to that frame; OneVision's trailing newline passed on as it is."""
    model = built(family)
    method = ts.ApET(ratio=0.25, num_basis=2)
    batch = video_inputs(model, [(3, "video", 2)], frames=3)
    schedule = method.schedule(4, model.config.model_type)
    with torch.no_grad():
        pooled = model.model.get_video_features(pixel_values_videos=batch["pixel_values_videos"],
                                                return_dict=True).pooler_output[0]
    expected = []
    for f in range(3):
        frame = pooled[None, f * FRAME_TOKENS : (f + 1) * FRAME_TOKENS]
        expected.append(schedule.vision_plan(frame, schedule.vision_keep(FRAME_TOKENS), None).apply(frame)[0])
    expected.append(pooled[3 * FRAME_TOKENS :])  # the newline (OneVision), or nothing
    with ts.compress(model, method):
        got = language_inputs(model, batch)["inputs_embeds"][0, 3:-2]
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [ts.ApET(ratio=0.25, num_basis=2), ts.ALVTS(ratio=0.4, rank=8)],
                         ids=lambda m: type(m).__name__)
def test_qwen_videos_of_different_lengths_in_one_batch(method):
    """Qwen2.5-VL: videos of 2 and 3 frame groups in one batch equal each prompt alone; every frame group
    keeps its own schedule's count (ALVTS included: per frame group, not per clip)."""
    model = tiny_qwen("qwen2_5_vl")
    batch = build_inputs("qwen2_5_vl", [[3, ("video", (2, 16, 16)), 4], [2, ("video", (3, 16, 16)), 1]])
    check_batch_equals_rows(model, batch, [qwen_row(batch, 0, "video"), qwen_row(batch, 1, "video")], method, steps=2)
    with ts.compress(model, method) as handle:
        forward_logits(model, batch)
    counts = handle.schedule.tokens_per_layer(64)
    assert handle.stats.tokens_per_layer.tolist() == [[2 * c for c in counts], [3 * c for c in counts]]
    last = f"layer{handle.schedule.num_layers - 1}" if handle.schedule.routing is not None else "stage2"
    assert handle.stats.kept_per_frame(last) == [[counts[-1]] * 2, [counts[-1]] * 3]


def test_video_llava_frame_counts_change_between_calls():
    """Video-LLaVA takes one (V, F, ...) tensor, so one batch shares F; calls with 2 and then 4 frames under
    one handle each keep the per-frame count, and cached generation equals uncached on both."""
    model = built("video_llava")
    method = ts.ApET(ratio=0.25, num_basis=2)
    for frames in (2, 4):
        batch = video_inputs(model, [(3, "video", 2)], frames=frames)
        check_cache_generation(model, batch, method, steps=2)
        with ts.compress(model, method) as handle:
            forward_logits(model, batch)
        assert handle.stats.kept_per_frame("stage1") == [[handle.schedule.vision_keep(FRAME_TOKENS)] * frames]


def test_llava_next_video_visionzip_runs_on_images():
    """VisionZip, refused on NeXT-Video's pooled video rows (the matrix), compresses its AnyRes images:
    a batch equals each prompt alone and the counts follow the schedule."""
    model = built("llava_next_video")
    batch = anyres_inputs(model, [(5, 7), (2, 3)], [(40, 70), (90, 60)])
    method = ts.VisionZip(ratio=0.25)
    check_batch_equals_rows(model, batch, [anyres_row(batch, 0), anyres_row(batch, 1)], method, steps=2)
    with ts.compress(model, method) as handle:
        forward_logits(model, batch)
    expected = [handle.schedule.tokens_per_layer(item.budget_tokens)[0] + int(item.pinned.sum())
                for item in handle.stats.items]
    assert handle.stats.tokens_per_layer[:, 0].tolist() == expected



@pytest.mark.parametrize("method", [ts.ApET(ratio=0.25, num_basis=2), ts.DART(ratio=0.6)], ids=lambda m: type(m).__name__)
def test_replay_reproduces_a_video_prefill(method):
    """The speed benchmark's oracle: `Replay.from_handle` keeps the same tokens of every frame (per-frame
    plans replayed in the order the prefill asked for them) and gives the same per-layer counts."""
    model = built("video_llava")
    batch = FAMILIES["video_llava"].batch(model)
    with ts.compress(model, method) as handle:
        forward_logits(model, batch)
    with ts.compress(model, ts.Replay.from_handle(handle)) as replayed:
        forward_logits(model, batch)
    assert torch.equal(replayed.stats.tokens_per_layer, handle.stats.tokens_per_layer)
    for original, again in zip(handle.stats.kept, replayed.stats.kept):
        assert original.keys() == again.keys()
        assert all(torch.equal(original[stage], again[stage]) for stage in original)
