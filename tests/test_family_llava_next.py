"""The test contract (tests/contract.py) on tiny LLaVA-NeXT and LLaVA-OneVision models (AnyRes crops of 144 tokens).

An AnyRes image is one visual item over its packed tokens: base crop, unpadded tiles, one image-newline
token per tile row. Newlines are pinned (always kept), so every count below is the schedule's count
for the image's non-newline tokens plus its newlines, both taken from the unwrapped model's packing.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import LlavaNextConfig, LlavaOnevisionConfig
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

import tokensieve as ts
from contract import (
    check_attention_implementations,
    check_batch_equals_rows,
    check_cache_generation,
    check_keep_all,
    check_removal,
    check_save_load_roundtrip,
    forward_logits,
)
from tiny import IMAGE_TOKEN
from tiny_llava_next import (
    CROP,
    KINDS,
    PINPOINTS,
    SIZES,
    anyres_inputs,
    crops_of,
    newline_rows,
    packed_images,
    row_inputs,
    tiny_anyres,
)
from tokensieve.models import family_for
from tokensieve.models.llava_next import LlavaNextFamily, packed_layout, split_keep
from tokensieve.models.llava_onevision import LlavaOnevisionFamily, max_tiles_of

# 64 of 576 tokens, as a ratio: a 408-token image keeps 68 at stage 1 and 23 after layer 2
APET_64 = ts.ApET(ratio=64 / 576, num_basis=4)
SIDE = 12  # tokens along a crop side: 48 / 4


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def model(kind):
    return tiny_anyres(kind, "sdpa")


@pytest.fixture(scope="module")
def batch(model):
    return anyres_inputs(model, [(5, 7), (2, 3)], SIZES)


def packed_counts(model, inputs: dict) -> list[tuple[int, int]]:
    """(non-newline tokens, newline tokens) of each image, from the unwrapped model's packing."""
    counts = []
    for packed in packed_images(model, inputs["pixel_values"], inputs["image_sizes"]):
        newlines = int(newline_rows(model, packed).sum())
        counts.append((packed.shape[0] - newlines, newlines))
    return counts


def hooked(model) -> list[str]:
    return ["model", "model.multi_modal_projector", "model.language_model", "model.language_model.layers.2"]


# ------------------------------------------------------------------------------ packing geometry
def _layout(model, size, crops):
    config = model.config
    max_tiles = max_tiles_of(config.vision_aspect_ratio) if config.model_type == "llava_onevision" else None
    return packed_layout(SIDE, crops, size, PINPOINTS, CROP, max_tiles, family_for(model).helpers)


def _pack_markers(model, size, crops) -> torch.Tensor:
    """(P,) the model's packing of crop tokens whose single feature is 1 + their flat (crop, token) index;
    image newlines are -1."""
    markers = (torch.arange(crops * SIDE * SIDE, dtype=torch.float32) + 1).view(crops, SIDE * SIDE, 1)
    extra = ({"vision_feature_select_strategy": "default"} if model.config.model_type == "llava_next"
             else {"vision_aspect_ratio": model.config.vision_aspect_ratio})
    packed, _ = model.model.pack_image_features(
        image_features=[markers], image_sizes=torch.tensor([size]), image_newline=torch.tensor([-1.0]), **extra)
    return packed[0][:, 0]


SIZES_TO_PACK = [(40, 70), (90, 60), (90, 40), (48, 48), (96, 96), (33, 97), (97, 33), (60, 61), (20, 90),
                 (100, 21), (47, 95), (95, 47), (200, 130)]


def test_packing_map_matches_model(model):
    resized = 0
    for size in SIZES_TO_PACK:
        for crops in (crops_of(size), 1):
            layout = _layout(model, size, crops)
            packed = _pack_markers(model, size, crops)
            markers = torch.arange(crops * SIDE * SIDE).view(crops, -1) + 1
            assert packed.shape[0] == layout.length, size
            assert torch.equal(packed == -1, layout.newline), size
            mapped = layout.position >= 0
            assert torch.equal(packed[layout.position[mapped]], markers[mapped].float()), size
            plain = ~layout.newline & ~layout.resized
            assert int(mapped.sum()) == int(plain.sum()), size  # a bijection onto the plain packed tokens
            assert mapped[0].all(), size  # the base crop is never cut
            resized += int(layout.resized.any())
    # the OneVision config (anyres_max_2) interpolates the 2x2 grids; LLaVA-NeXT never does
    assert (resized > 0) == (model.config.model_type == "llava_onevision")


@pytest.mark.parametrize("config_class", [LlavaNextConfig, LlavaOnevisionConfig])
def test_packing_map_matches_real_geometry(config_class):
    """The default (real checkpoint) configs: 24x24 or 27x27 crops, their pinpoints, anyres_max_9.

    The model class's own pack_image_features runs on marker features; it only reads `self.config`.
    """
    config = config_class()
    model_class, family = ((LlavaNextModel, LlavaNextFamily()) if config_class is LlavaNextConfig
                           else (LlavaOnevisionModel, LlavaOnevisionFamily()))
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    onevision = config_class is LlavaOnevisionConfig
    resized = 0
    for size in [(480, 640), (1080, 1920), (336, 1008), (2000, 300), (512, 512), (777, 1333), (3000, 4000)]:
        crops = image_size_to_num_patches(list(size), config.image_grid_pinpoints, vision.image_size)
        markers = torch.arange(crops * side * side, dtype=torch.float32).view(crops, -1) + 1
        extra = ({"vision_aspect_ratio": config.vision_aspect_ratio} if onevision
                 else {"vision_feature_select_strategy": "default"})
        packed, _ = model_class.pack_image_features(
            SimpleNamespace(config=config), [markers[..., None]], torch.tensor([size]),
            image_newline=torch.tensor([-1.0]), **extra)
        packed = packed[0][:, 0]
        layout = packed_layout(side, crops, size, config.image_grid_pinpoints, vision.image_size,
                               max_tiles_of(config.vision_aspect_ratio) if onevision else None, family.helpers)
        mapped = layout.position >= 0
        assert packed.shape[0] == layout.length and torch.equal(packed == -1, layout.newline), size
        assert torch.equal(packed[layout.position[mapped]], markers[mapped]), size
        assert int(mapped.sum()) == int((~layout.newline & ~layout.resized).sum()), size
        resized += int(layout.resized.any())
    assert (resized > 0) == onevision  # anyres_max_9 interpolates the HD images' tile grids


def test_split_keep_is_proportional_and_exact():
    assert split_keep(68, [144, 132, 132], 5) == [24, 22, 22]
    assert split_keep(20, [100, 4], 5) == [16, 4]  # a small crop keeps all of its tokens
    assert split_keep(12, [100, 100, 3], 5) == [5, 5, 3]  # floors exceed the keep: floors
    assert split_keep(500, [144, 132], 5) == [144, 132]
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.choice([0, 3, 40, 96, 132, 144]) for _ in range(rng.randint(1, 6))]
        minimum = rng.randint(1, 12)
        floors = [min(s, minimum) for s in sizes]
        if sum(floors) >= sum(sizes):
            continue
        keep = rng.randint(sum(floors) + 1, sum(sizes))
        counts = split_keep(keep, sizes, minimum)
        assert sum(counts) == keep, (keep, sizes, minimum, counts)
        assert all(f <= c <= s for f, c, s in zip(floors, counts, sizes)), (keep, sizes, minimum, counts)


# ------------------------------------------------------------------------------ the contract
def test_keep_all_is_identical(model, batch):
    check_keep_all(model, batch, ts.ApET(ratio=1.0))


def test_removal_restores_model(model, batch):
    check_removal(model, batch, APET_64, hooked)


def test_cache_generation_equals_no_cache(model, batch):
    check_cache_generation(model, batch, APET_64)


def test_batch_equals_each_row(model, batch):
    assert batch["image_sizes"][0].tolist() != batch["image_sizes"][1].tolist()
    check_batch_equals_rows(model, batch, [row_inputs(batch, 0), row_inputs(batch, 1)], APET_64)


@pytest.mark.parametrize("method", [
    APET_64,
    ts.ApET(ratio=128 / 576, num_basis=4),
    ts.ApET(stage1=40, stage2=20, layer=1, num_basis=4),
])
def test_tokens_per_layer_follow_schedule(model, batch, method):
    counts = packed_counts(model, batch)
    with ts.compress(model, method) as handle:
        forward_logits(model, batch)
    schedule = handle.schedule
    expected = torch.tensor([[t + newlines for t in schedule.tokens_per_layer(n)] for n, newlines in counts])
    assert torch.equal(handle.stats.tokens_per_layer, expected), (handle.stats.tokens_per_layer, expected)
    assert (expected < torch.tensor([[n + newlines] for n, newlines in counts])).all()  # it did compress
    for kept, (n, newlines) in zip(handle.stats.kept, counts):
        assert kept["stage1"].numel() == schedule.vision_keep(n) + newlines
        assert set(kept["stage2"].tolist()) <= set(kept["stage1"].tolist())


def test_newlines_kept_at_every_layer(model, batch):
    packed = packed_images(model, batch["pixel_values"], batch["image_sizes"])
    with ts.compress(model, APET_64) as handle:
        forward_logits(model, batch)
    stats = handle.stats
    stage2_layer = handle.schedule.stages[0].layer
    for i, (kept, features) in enumerate(zip(stats.kept, packed)):
        newlines = set(newline_rows(model, features).nonzero().flatten().tolist())
        assert newlines and kept.keys() == {"stage1", "stage2"}
        for stage, layers in (("stage1", range(stage2_layer)), ("stage2", range(stage2_layer, 4))):
            assert newlines <= set(kept[stage].tolist()), stage
            for layer in layers:  # what each layer processed is exactly that stage's kept set
                assert int(stats.tokens_per_layer[stats.rows[i], layer]) == kept[stage].numel()


def test_kept_rows_carry_features(model, batch):
    """Every row the language model receives holds a feature: no kept placeholder points at a crop token
    that stage 1 dropped (those are zero before packing)."""
    seen = []

    def capture(module, args, kwargs):
        seen.append((kwargs["inputs_embeds"], kwargs["attention_mask"]))

    with ts.compress(model, APET_64):
        handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            forward_logits(model, batch)
        finally:
            handle.remove()
    embeds, mask = seen[0]
    empty = (embeds == 0).all(-1) & mask.bool()
    assert not empty.any(), empty.nonzero()


def test_attention_implementations_agree(kind, batch):
    check_attention_implementations(lambda attn: tiny_anyres(kind, attn), batch, APET_64)


def test_save_load_roundtrip(model, batch, tmp_path):
    check_save_load_roundtrip(model, batch, APET_64, tmp_path)


# ------------------------------------------------------------------------------ OneVision specifics
@pytest.fixture(scope="module")
def onevision():
    return tiny_anyres("llava_onevision")


def test_onevision_several_images_in_one_prompt(onevision):
    """batch_num_images > 1: each image is its base crop plus one newline, two items in one row."""
    model = onevision
    generator = torch.Generator().manual_seed(1)
    per_image = SIDE * SIDE + 1
    text = torch.randint(1, IMAGE_TOKEN, (6,), generator=generator)
    image = torch.full((per_image,), IMAGE_TOKEN)
    input_ids = torch.cat([text[:2], image, text[2:4], image, text[4:]])[None]
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": torch.randn(2, 5, 3, CROP, CROP, generator=generator),
              "image_sizes": torch.tensor([[90, 60], [40, 70]]), "batch_num_images": torch.tensor([2])}
    check_keep_all(model, inputs, ts.ApET(ratio=1.0))
    with ts.compress(model, APET_64) as handle:
        forward_logits(model, inputs)
    per_layer = [t + 1 for t in handle.schedule.tokens_per_layer(SIDE * SIDE)]
    assert handle.stats.tokens_per_layer[0].tolist() == [2 * t for t in per_layer]
    assert [kept["stage1"][-1].item() for kept in handle.stats.kept] == [SIDE * SIDE] * 2  # the newline

