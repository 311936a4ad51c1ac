"""Tiny LLaVA-NeXT and LLaVA-OneVision models built from configs (random weights, no download).

Crops are 48x48 pixels of 4x4 patches: 12x12 = 144 tokens each; the AnyRes pinpoints allow 1x2, 2x1
and 2x2 tile grids. The OneVision model uses vision_aspect_ratio "anyres_max_2", so the tile grid of a
2x2 image is interpolated after the projector (as "anyres_max_9" does for large real images).
Inputs are built without a processor; the placeholder count of each image is what the unwrapped
model's own packing produces.
"""
from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from tiny import IMAGE_TOKEN, PAD_TOKEN, VOCAB, left_pad, tiny_llama_config

VIDEO_TOKEN = 101
CROP = 48
PATCH = 4
PINPOINTS = [[48, 96], [96, 48], [96, 96]]  # (height, width): 1x2, 2x1, 2x2 tiles
SIZES = [(40, 70), (90, 60)]  # (height, width): a 1x2 grid (3 crops) and a 2x2 grid (5 crops)
KINDS = ("llava_next", "llava_onevision")


def _vision(kind: str):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=CROP, patch_size=PATCH)
    if kind == "llava_next":
        return CLIPVisionConfig(projection_dim=32, **common)
    return SiglipVisionConfig(vision_use_head=False, **common)


def _text(kind: str):
    if kind == "llava_next":
        return tiny_llama_config(max_position_embeddings=1024)
    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=PAD_TOKEN, tie_word_embeddings=False,
    )


def tiny_anyres(kind: str, attn: str = "sdpa", seed: int = 0):
    """A tiny LlavaNext (CLIP + 4-layer Llama) or LlavaOnevision (SigLIP + 4-layer Qwen2) model."""
    torch.manual_seed(seed)
    common = dict(vision_config=_vision(kind), text_config=_text(kind), image_token_index=IMAGE_TOKEN,
                  image_grid_pinpoints=PINPOINTS, projector_hidden_act="gelu")
    if kind == "llava_next":
        config = LlavaNextConfig(vision_feature_layer=-2, vision_feature_select_strategy="default", **common)
        model = LlavaNextForConditionalGeneration(config)
    else:
        config = LlavaOnevisionConfig(vision_feature_layer=-1, vision_feature_select_strategy="full",
                                      video_token_index=VIDEO_TOKEN, vision_aspect_ratio="anyres_max_2", **common)
        model = LlavaOnevisionForConditionalGeneration(config)
    model.eval()
    model.set_attn_implementation(attn)
    return model


def crops_of(size: tuple[int, int]) -> int:
    """Crops the processor makes for an image of (height, width): base view + AnyRes tiles."""
    return image_size_to_num_patches(list(size), PINPOINTS, CROP)


def packed_images(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """Each image's (P, D_text) packed features, from the unwrapped model."""
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output)


def newline_rows(model, packed: torch.Tensor) -> torch.Tensor:
    """(P,) bool: the rows of one packed image that are the image-newline embedding."""
    return (packed == model.model.image_newline.to(packed.dtype)).all(-1)


def anyres_inputs(model, prompts: list[tuple[int, int]], sizes: list[tuple[int, int]], seed: int = 0) -> dict:
    """A left-padded batch, one image per prompt: prompt i is (text before, text after) around image i.

    Returns input_ids, attention_mask, pixel_values (B, max crops, 3, 48, 48) and image_sizes (B, 2).
    """
    generator = torch.Generator().manual_seed(seed)
    crops = [crops_of(size) for size in sizes]
    pixel_values = torch.zeros(len(sizes), max(crops), 3, CROP, CROP)
    for i, count in enumerate(crops):
        pixel_values[i, :count] = torch.randn(count, 3, CROP, CROP, generator=generator)
    image_sizes = torch.tensor(sizes)
    counts = [p.shape[0] for p in packed_images(model, pixel_values, image_sizes)]
    rows = []
    for (before, after), n in zip(prompts, counts):
        text = torch.randint(1, IMAGE_TOKEN, (before + after,), generator=generator)
        rows.append(torch.cat([text[:before], torch.full((n,), IMAGE_TOKEN), text[before:]]))
    input_ids, attention_mask = left_pad(rows)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_sizes": image_sizes}


def row_inputs(batch: dict, i: int) -> dict:
    """Prompt i of an anyres_inputs batch alone: its padding and unused crops removed."""
    keep = batch["attention_mask"][i].bool()
    crops = crops_of(tuple(batch["image_sizes"][i].tolist()))
    return {"input_ids": batch["input_ids"][i : i + 1, keep], "attention_mask": batch["attention_mask"][i : i + 1, keep],
            "pixel_values": batch["pixel_values"][i : i + 1, :crops], "image_sizes": batch["image_sizes"][i : i + 1]}
