"""Tiny random-weight checkpoints saved the way a hub checkpoint is laid out, with processors built offline,
and tiny video files, for the lmms-eval model's tests.

The tokenizer is the shipped small VLM's (a 44-word vocabulary) with each family's special tokens added;
the tiny models (tiny_qwen.py, tiny_video.py) get those tokens' ids and an embedding table of the
tokenizer's size, so greedy answers are words. Video settings are written to
video_preprocessor_config.json, processor arguments to processor_config.json, as on the hub.
"""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
from transformers import (AutoTokenizer, LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil,
                          VideoLlavaImageProcessor)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tiny_llava_next import CROP, PATCH, PINPOINTS, tiny_anyres
from tiny_qwen import MERGE, TEMPORAL_PATCH, tiny_qwen
from tiny_qwen import PATCH as QWEN_PATCH
from tiny_video import VIEW, tiny_llava_next_video, tiny_video_llava
from tokensieve.smallvlm import CHECKPOINT

ONEVISION_SEED = 2  # a seed whose tiny OneVision model answers in words, not only special tokens
QWEN_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen's prompt layout (system, user turns with image and video entries, the assistant's turn) in a template of
# our own: the real checkpoints ship theirs.
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
# Qwen images and video frames: 4-pixel merged patches, at most 24 x 24 pixels (36 tokens); Qwen3-VL's video
# limit counts the pixels of a clip's frames (4 here).
QWEN_IMAGE_PIXELS = {"min_pixels": 8 * 8, "max_pixels": 24 * 24}
QWEN_VIDEO_PIXELS = {"shortest_edge": 8 * 8, "longest_edge": 24 * 24}


def tokenizer_with(tokens: list[str]):
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    return tokenizer


def save(model, tokenizer, folder: Path, image_processor, video_settings: dict, processor_arguments: dict,
         token_ids: dict[str, str]) -> Path:
    """Writes the checkpoint: the model with the tokenizer's ids for its placeholders, the tokenizer (with its
    chat template), the image processor, the video settings and the processor arguments."""
    for name, token in token_ids.items():
        setattr(model.config, name, tokenizer.convert_tokens_to_ids(token))
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video_settings))
    (folder / "processor_config.json").write_text(json.dumps(processor_arguments))
    return folder


def qwen_checkpoint(model_type: str, folder: Path) -> Path:
    tokenizer = tokenizer_with(QWEN_TOKENS)
    tokenizer.chat_template = QWEN_TEMPLATE
    shape = {"patch_size": QWEN_PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL_PATCH}
    ids = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
           "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    video_pixels = dict(QWEN_VIDEO_PIXELS)
    if model_type == "qwen3_vl":
        video_pixels["longest_edge"] *= 4
    return save(tiny_qwen(model_type), tokenizer, folder, Qwen2VLImageProcessorPil(**shape, **QWEN_IMAGE_PIXELS),
                {**shape, "size": video_pixels}, {}, ids)


def llava_video_checkpoint(model_type: str, folder: Path) -> Path:
    """Video-LLaVA (24-pixel views), LLaVA-NeXT-Video or LLaVA-OneVision (48-pixel crops), with the small VLM's
    chat template."""
    tokenizer = tokenizer_with(["<video>"])
    crop = {"height": CROP, "width": CROP}
    if model_type == "video_llava":
        model, patch = tiny_video_llava(), 4
        image_processor = VideoLlavaImageProcessor(size={"shortest_edge": VIEW}, crop_size={"height": VIEW, "width": VIEW})
        video = {"size": {"shortest_edge": VIEW}, "crop_size": {"height": VIEW, "width": VIEW}}
    elif model_type == "llava_next_video":
        model, patch = tiny_llava_next_video(), PATCH
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": CROP}, image_grid_pinpoints=PINPOINTS,
                                                     crop_size=crop)
        video = {"size": {"shortest_edge": CROP}, "crop_size": crop}
    else:
        model = tiny_anyres("llava_onevision", seed=ONEVISION_SEED)
        image_processor = LlavaOnevisionImageProcessorPil(size=crop, image_grid_pinpoints=PINPOINTS)
        video = {"size": crop}
        arguments = {"num_image_tokens": (CROP // PATCH) ** 2, "vision_feature_select_strategy": "full",
                     "vision_aspect_ratio": "anyres_max_2"}
    if model_type != "llava_onevision":
        arguments = {"patch_size": patch, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    return save(model, tokenizer, folder, image_processor, video, arguments,
                {"image_token_index": "<image>", "video_token_index": "<video>"})


def write_video(path: Path, frames: int, height: int = 48, width: int = 64, seed: int = 0, fps: int = 4) -> Path:
    """An MPEG-4 file of `frames` random RGB frames (sides multiples of 16, which decord reads exactly)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
