"""The Qwen2-VL, Qwen2.5-VL and Qwen3-VL families against the contract, on tiny models from configs."""
from __future__ import annotations

import pytest
import torch

import tokensieve as ts

from contract import (
    check_attention_implementations,
    check_batch_equals_rows,
    check_cache_generation,
    check_keep_all,
    check_removal,
    check_save_load_roundtrip,
    check_schedule_counts,
    forward_logits,
    greedy,
    module_snapshot,
)
from tiny_qwen import IMAGE_TOKEN, MODEL_TYPES, VIDEO_TOKEN, build_inputs, qwen_inputs, row, tiny_qwen

GRIDS = [(16, 16), (16, 20)]  # 64 and 80 merged tokens
SIZES = [64, 80]
METHOD = ts.ApET(ratio=64 / 576, num_basis=2)  # 64 -> 11 then 3 tokens, 80 -> 13 then 5


def two_images(model_type: str) -> dict:
    return qwen_inputs(model_type, [(3, GRIDS[0], 4), (6, GRIDS[1], 2)])


def capture_language_model(model, store: list):
    """A pre-hook (registered last, so it sees what the runtime passes on) recording the LM's kwargs."""
    def hook(module, args, kwargs):
        store.append(dict(kwargs))
    return model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def reference_reduction(model, method, features, frame_tokens: int | None = None, extra=()):
    """The stage-1 reduction applied by hand: per item (per frame of frame_tokens for videos).

    features: tuple of (n_i, D). extra: more tuples aligned with features (deepstack layers).
    Returns the reduced rows of all items concatenated (sum k, D), the same for each extra, and
    the kept index of each item (over its own tokens).
    """
    schedule = method.schedule(len(model.model.language_model.layers), model.config.model_type)
    reduced, reduced_extra, kept = [], [[] for _ in extra], []
    for i, x in enumerate(features):
        step = frame_tokens or x.shape[0]
        item_kept = []
        for start in range(0, x.shape[0], step):
            plan = schedule.vision_plan(x[None, start : start + step], schedule.vision_keep(step), None)
            reduced.append(plan.apply(x[None, start : start + step])[0])
            for j, tensors in enumerate(extra):
                reduced_extra[j].append(plan.apply(tensors[i][None, start : start + step])[0])
            item_kept.append(plan.kept_index[0] + start)
        kept.append(torch.cat(item_kept))
    return torch.cat(reduced), [torch.cat(r) for r in reduced_extra], kept


# ---------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_keep_all(model_type):
    check_keep_all(tiny_qwen(model_type), two_images(model_type), ts.ApET(ratio=1.0))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_removal(model_type):
    model = tiny_qwen(model_type)
    layers = len(model.model.language_model.layers)

    def hooked(model):
        return ["model", "model.language_model"] + [f"model.language_model.layers.{i}" for i in range(layers)]

    check_removal(model, two_images(model_type), METHOD, hooked)
    assert "get_image_features" not in vars(model.model) and "get_video_features" not in vars(model.model)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_cache_generation(model_type):
    check_cache_generation(tiny_qwen(model_type), two_images(model_type), METHOD)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_batch_equals_rows(model_type):
    batch = two_images(model_type)
    check_batch_equals_rows(tiny_qwen(model_type), batch, [row(batch, 0), row(batch, 1)], METHOD)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_schedule_counts(model_type):
    handle = check_schedule_counts(tiny_qwen(model_type), two_images(model_type), METHOD, SIZES)
    assert [it.grid for it in handle.stats.items] == [(8, 8), (8, 10)]
    assert [k["stage1"].numel() for k in handle.stats.kept] == [11, 13]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_attention_implementations(model_type):
    check_attention_implementations(lambda attn: tiny_qwen(model_type, attn), two_images(model_type), METHOD)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_save_load_roundtrip(model_type, tmp_path):
    check_save_load_roundtrip(tiny_qwen(model_type), two_images(model_type), METHOD, tmp_path)


# ---------------------------------------------------------------------------------------------- family


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_reduced_features_keep_original_positions(model_type):
    """The LM gets the plan's output at the kept visual rows, with their original M-RoPE positions."""
    model, inputs = tiny_qwen(model_type), two_images(model_type)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    reduced, _, kept = reference_reduction(model, METHOD, features)
    plain, compressed = [], []
    handle = capture_language_model(model, plain)
    forward_logits(model, inputs)
    handle.remove()
    with ts.compress(model, METHOD):
        handle = capture_language_model(model, compressed)
        forward_logits(model, inputs)
        handle.remove()
    (before,), (after,) = plain, compressed
    visual = inputs["input_ids"] == IMAGE_TOKEN
    keep = inputs["attention_mask"].bool() & ~visual
    for b in range(2):
        keep[b, visual[b].nonzero().flatten()[kept[b]]] = True
    got_embeds = []
    for b in range(2):
        count = int(keep[b].sum())
        assert int(after["attention_mask"][b].sum()) == count
        torch.testing.assert_close(after["position_ids"][:, b, -count:], before["position_ids"][:, b, keep[b]])
        rows = after["inputs_embeds"][b, -count:]
        is_visual = visual[b, keep[b]]
        torch.testing.assert_close(rows[~is_visual], before["inputs_embeds"][b, keep[b]][~is_visual])
        got_embeds.append(rows[is_visual])
    torch.testing.assert_close(torch.cat(got_embeds), reduced)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_decoding_keeps_original_positions(model_type):
    """Every decoding step gets the position ids the uncompressed model gets (gaps stay)."""
    model, inputs = tiny_qwen(model_type), two_images(model_type)
    plain, compressed = [], []
    handle = capture_language_model(model, plain)
    greedy(model, inputs, 4)
    handle.remove()
    with ts.compress(model, METHOD):
        handle = capture_language_model(model, compressed)
        greedy(model, inputs, 4)
        handle.remove()
    assert compressed[0]["inputs_embeds"].shape[1] < plain[0]["inputs_embeds"].shape[1]
    assert len(plain) == len(compressed) == 4
    for a, b in zip(plain[1:], compressed[1:]):
        assert b["inputs_embeds"].shape[1] == 1
        assert torch.equal(a["position_ids"], b["position_ids"])


def manual_greedy(model, inputs: dict, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding by hand with the cache, passing neither attention mask nor position ids.

    Returns the (1, steps) tokens and the position ids the LM got at each decoding step.
    """
    seen = []
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        tokens = [out.logits[:, -1:].argmax(-1)]
        handle = capture_language_model(model, seen)
        for _ in range(steps - 1):
            out = model(input_ids=tokens[-1], past_key_values=out.past_key_values)
            tokens.append(out.logits[:, -1:].argmax(-1))
        handle.remove()
    return torch.cat(tokens, dim=1), [kwargs["position_ids"] for kwargs in seen]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hand_written_decoding_keeps_original_positions(model_type):
    """Without mask or position ids the model would take positions from the shortened cache."""
    model, inputs = tiny_qwen(model_type), qwen_inputs(model_type, [(3, GRIDS[1], 4)])
    _, plain = manual_greedy(model, inputs, 3)
    with ts.compress(model, METHOD):
        tokens, compressed = manual_greedy(model, inputs, 3)
        assert torch.equal(tokens, greedy(model, inputs, 3))
    assert len(plain) == len(compressed) == 2
    for a, b in zip(plain, compressed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_video_reduced_per_frame(model_type):
    """Stage 1 keeps the schedule's count in each frame group; the video is one item; cache == no cache."""
    model = tiny_qwen(model_type)
    inputs = build_inputs(model_type, [[3, ("video", (3, 16, 16)), 4]])
    check_cache_generation(model, inputs, METHOD)
    with ts.compress(model, METHOD) as handle:
        forward_logits(model, inputs)
    (item,), (kept,) = handle.stats.items, handle.stats.kept
    per_frame = handle.schedule.vision_keep(64)
    assert item.modality == "video" and item.keep.numel() == 192 and item.grid is None
    assert torch.bincount(kept["stage1"] // 64, minlength=3).tolist() == [per_frame] * 3
    layer = handle.schedule.stages[0].layer
    assert handle.stats.tokens_per_layer[0, :layer].tolist() == [3 * per_frame] * layer
    second = handle.schedule.stages[0].keep(64)
    assert second < per_frame
    assert handle.stats.tokens_per_layer[0, layer:].tolist() == [3 * second] * (len(handle.stats.tokens_per_layer[0]) - layer)
    assert torch.bincount(kept["stage2"] // 64, minlength=3).tolist() == [second] * 3


def test_qwen3_deepstack_stays_aligned():
    """Deepstack rows the LM gets are the same plans applied to each deepstack feature, on the kept rows."""
    model = tiny_qwen("qwen3_vl")
    inputs = build_inputs("qwen3_vl", [[3, ("image", (16, 20)), 2, ("video", (2, 16, 16)), 4]])
    with torch.no_grad():
        image = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    image_main, image_deep, _ = reference_reduction(model, METHOD, image.pooler_output, None, image.deepstack_features)
    video_main, video_deep, _ = reference_reduction(model, METHOD, video.pooler_output, 64, video.deepstack_features)
    store = []
    with ts.compress(model, METHOD):
        handle = capture_language_model(model, store)
        forward_logits(model, inputs)
        handle.remove()
    got = store[0]
    mask = got["visual_pos_masks"]
    assert mask.shape == got["inputs_embeds"].shape[:2]
    assert int(mask.sum()) == 13 + 2 * 11
    torch.testing.assert_close(got["inputs_embeds"][mask], torch.cat([image_main, video_main]))
    assert len(got["deepstack_visual_embeds"]) == 2
    for layer, embeds in enumerate(got["deepstack_visual_embeds"]):
        torch.testing.assert_close(embeds, torch.cat([image_deep[layer], video_deep[layer]]))
    assert not torch.allclose(got["deepstack_visual_embeds"][0], torch.cat([image_main, video_main]))
    check_cache_generation(model, inputs, METHOD)


def test_qwen3_stage2_before_deepstack_is_refused():
    model = tiny_qwen("qwen3_vl")  # 2 deepstack layers: stage 2 may start at layer 3 at the earliest
    before = module_snapshot(model)
    with pytest.raises(ValueError, match="deepstack"):
        ts.compress(model, ts.ApET(ratio=0.5, num_basis=2, layer=2))
    assert module_snapshot(model) == before
    ts.compress(model, ts.ApET(ratio=0.5, num_basis=2, layer=3)).remove()
    assert module_snapshot(model) == before


def test_sliding_window_is_refused():
    model = tiny_qwen("qwen2_vl", use_sliding_window=True, sliding_window=16, max_window_layers=2)
    before = module_snapshot(model)
    with pytest.raises(ValueError, match="sliding"):
        ts.compress(model, METHOD)
    assert module_snapshot(model) == before


def test_budget_below_the_minimum_keeps_the_minimum():
    """ApET at a mean of 4 asks stage 2 for 2 tokens, fewer than num_basis + 1 = 3: each image keeps 3,
    and the stats say so (Qwen's images have no nominal size that compress could check)."""
    model, inputs = tiny_qwen("qwen2_vl"), two_images("qwen2_vl")
    with ts.compress(model, ts.ApET(budget=4, num_basis=2)) as handle:
        forward_logits(model, inputs)
    assert handle.stats.floored == [["stage2"], ["stage2"]]
    assert handle.stats.tokens_per_layer.tolist() == [[6, 6, 3, 3]] * 2


def test_video_tokens_are_not_taken_for_images():
    """An image and a video in one prompt: each modality's items match its own placeholders."""
    model = tiny_qwen("qwen2_5_vl")
    inputs = build_inputs("qwen2_5_vl", [[2, ("video", (2, 16, 16)), 3, ("image", (16, 20)), 4]])
    with ts.compress(model, METHOD) as handle:
        forward_logits(model, inputs)
    assert [it.modality for it in handle.stats.items] == ["video", "image"]
    assert int((inputs["input_ids"] == VIDEO_TOKEN).sum()) == handle.stats.items[0].keep.numel() == 128
    check_cache_generation(model, inputs, METHOD)
