"""Tiny video VLMs built from configs (random weights, no download), and video inputs built without a
processor: Video-LLaVA (CLIP towers of 24x24-pixel views in 4x4 patches: 36 patches + CLS per frame),
LLaVA-NeXT-Video and LLaVA-OneVision (the tiny LLaVA-NeXT geometry, tiny_llava_next.py; a frame's 12x12
patches pooled to 6x6 = 36, plus one newline after a OneVision video's last frame)."""
from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

from tiny import IMAGE_TOKEN, left_pad, tiny_llama_config
from tiny_llava_next import CROP, PATCH, PINPOINTS, VIDEO_TOKEN, crops_of, packed_images

VIEW = 24  # Video-LLaVA's view size in pixels (4x4 patches: 36 patches and a CLS token)


def tiny_video_llava(attn: str = "sdpa", seed: int = 0) -> VideoLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=VIEW, patch_size=4, projection_dim=32)
    config = VideoLlavaConfig(vision_config=vision, text_config=tiny_llama_config(max_position_embeddings=1024),
                              image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN, vision_feature_layer=-2,
                              vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = VideoLlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def tiny_llava_next_video(attn: str = "sdpa", seed: int = 0) -> LlavaNextVideoForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=CROP, patch_size=PATCH, projection_dim=32)
    config = LlavaNextVideoConfig(vision_config=vision, text_config=tiny_llama_config(max_position_embeddings=1024),
                                  image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
                                  image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                                  vision_feature_select_strategy="default", projector_hidden_act="gelu",
                                  spatial_pool_mode="average", spatial_pool_stride=2)
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def video_tokens(model, frames: int) -> int:
    """Placeholder tokens of one video of `frames` frames, from the unwrapped model's own encoding."""
    vision = model.config.vision_config
    pixels = torch.zeros(1, frames, 3, vision.image_size, vision.image_size)
    with torch.no_grad():
        features = model.model.get_video_features(pixel_values_videos=pixels, return_dict=True).pooler_output
    return features.numel() // features.shape[-1]


def video_inputs(model, prompts: list[tuple], frames: int, seed: int = 0) -> dict:
    """A left-padded batch: prompt i is a tuple of text lengths and placeholders, e.g. (5, "video", 7) or
    (2, "image", 1, "video", 3); every video has `frames` frames.

    Images are one view each (Video-LLaVA) or AnyRes images of the first tiny LLaVA-NeXT size (NeXT-Video,
    OneVision).
    Returns input_ids, attention_mask, pixel_values_videos (V, F, 3, S, S), and pixel_values (+ image_sizes
    for NeXT-Video) when a prompt holds an image.
    """
    generator = torch.Generator().manual_seed(seed)
    side = model.config.vision_config.image_size
    anyres = model.config.model_type in ("llava_next_video", "llava_onevision")
    image_count = sum(part == "image" for prompt in prompts for part in prompt)
    video_count = sum(part == "video" for prompt in prompts for part in prompt)
    out = {"pixel_values_videos": torch.randn(video_count, frames, 3, side, side, generator=generator)}
    if image_count:
        if anyres:
            size = (40, 70)
            out["pixel_values"] = torch.randn(image_count, crops_of(size), 3, side, side, generator=generator)
            out["image_sizes"] = torch.tensor([size] * image_count)
            image_tokens = packed_images(model, out["pixel_values"], out["image_sizes"])[0].shape[0]
        else:
            out["pixel_values"] = torch.randn(image_count, 3, side, side, generator=generator)
            image_tokens = (side // model.config.vision_config.patch_size) ** 2
    lengths = {"video": video_tokens(model, frames), "image": image_tokens if image_count else 0}
    tokens = {"video": VIDEO_TOKEN, "image": IMAGE_TOKEN}
    rows = []
    for prompt in prompts:
        pieces = [torch.full((lengths[part],), tokens[part]) if isinstance(part, str)
                  else torch.randint(1, IMAGE_TOKEN, (part,), generator=generator) for part in prompt]
        rows.append(torch.cat(pieces))
    out["input_ids"], out["attention_mask"] = left_pad(rows)
    return out


def video_row(batch: dict, prompts: list[tuple], i: int) -> dict:
    """Prompt i of a `video_inputs` batch alone: its padding removed, its own images and videos."""
    def first(kind: str) -> int:
        return sum(part == kind for prompt in prompts[:i] for part in prompt)

    def count(kind: str) -> int:
        return sum(part == kind for part in prompts[i])

    keep = batch["attention_mask"][i].bool()
    row = {"input_ids": batch["input_ids"][i : i + 1, keep], "attention_mask": batch["attention_mask"][i : i + 1, keep]}
    if count("video"):
        row["pixel_values_videos"] = batch["pixel_values_videos"][first("video") : first("video") + count("video")]
    if count("image"):
        row["pixel_values"] = batch["pixel_values"][first("image") : first("image") + count("image")]
        if "image_sizes" in batch:
            row["image_sizes"] = batch["image_sizes"][first("image") : first("image") + count("image")]
    return row
