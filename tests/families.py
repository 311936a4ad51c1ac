"""One list of every family the tests build: a tiny model, a left-padded batch of two prompts with
images of different sizes (or, for the video families, a video beside an image and a video), each
prompt alone, and a batch where one image is very small."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from flash_stand_in import FLASH_IMPLEMENTATIONS, as_flash
from tiny import llava_inputs, row_inputs, tiny_llava
from tiny_llava_next import SIZES, anyres_inputs, tiny_anyres
from tiny_llava_next import row_inputs as anyres_row
from tiny_qwen import qwen_inputs, row as qwen_row, tiny_qwen
from tiny_video import tiny_llava_next_video, tiny_video_llava, video_inputs, video_row


@dataclass(frozen=True)
class FamilyCase:
    """make(attn) builds the tiny model; batch(model) the two-prompt batch; rows(batch) each prompt
    alone; small(model) a batch whose second image is smaller than most methods' minimums (None where
    the family's images all have one size)."""

    name: str
    make: Callable
    batch: Callable
    rows: Callable
    small: Callable | None = None


def _qwen(model_type: str) -> FamilyCase:
    return FamilyCase(
        model_type,
        make=lambda attn: tiny_qwen(model_type, attn),
        batch=lambda model: qwen_inputs(model_type, [(3, (16, 16), 4), (6, (16, 20), 2)]),
        rows=lambda batch: [qwen_row(batch, 0), qwen_row(batch, 1)],
        small=lambda model: qwen_inputs(model_type, [(3, (16, 16), 4), (2, (4, 4), 3)]),  # 64 and 4 tokens
    )


def _anyres(kind: str) -> FamilyCase:
    return FamilyCase(
        kind,
        make=lambda attn: tiny_anyres(kind, attn),
        batch=lambda model: anyres_inputs(model, [(5, 7), (2, 3)], SIZES),
        rows=lambda batch: [anyres_row(batch, 0), anyres_row(batch, 1)],
    )


# Video families: a prompt with one video beside one with an image and a video where the image is
# small (Video-LLaVA: 36 tokens), two video prompts where it is a 400-token AnyRes image (NeXT-Video,
# OneVision: their mixed prompts run in test_family_video.py). 3 frames each: the models take one
# (V, F, ...) tensor of videos, so a batch shares its frame count.
VIDEO_PROMPTS = [(5, "video", 7), (2, "image", 1, "video", 3)]
VIDEO_ONLY_PROMPTS = [(5, "video", 7), (2, "video", 3)]


def _video(name: str, make: Callable, prompts: list[tuple]) -> FamilyCase:
    return FamilyCase(
        name,
        make=make,
        batch=lambda model: video_inputs(model, prompts, frames=3),
        rows=lambda batch: [video_row(batch, prompts, i) for i in range(len(prompts))],
    )


FAMILIES = {
    "llava": FamilyCase(
        "llava",
        make=lambda attn: tiny_llava(attn),
        batch=lambda model: llava_inputs(model, [(5, 7), (2, 3)]),
        rows=lambda batch: [row_inputs(batch, 0), row_inputs(batch, 1)],
    ),
    "llava_next": _anyres("llava_next"),
    "llava_onevision": _anyres("llava_onevision"),
    "qwen2_vl": _qwen("qwen2_vl"),
    "qwen2_5_vl": _qwen("qwen2_5_vl"),
    "qwen3_vl": _qwen("qwen3_vl"),
    "video_llava": _video("video_llava", tiny_video_llava, VIDEO_PROMPTS),
    "llava_next_video": _video("llava_next_video", tiny_llava_next_video, VIDEO_ONLY_PROMPTS),
    "llava_onevision_video": _video("llava_onevision_video", lambda attn: tiny_anyres("llava_onevision", attn),
                                    VIDEO_ONLY_PROMPTS),
}


@lru_cache(maxsize=None)
def built(family: str, attn: str = "sdpa"):
    """The tiny model of a family, built once per test process (tests must leave it as they found it).

    Under a FlashAttention implementation: the same weights (the same seed), switched with `as_flash`;
    running it needs the `flash_kernels` fixture."""
    if attn in FLASH_IMPLEMENTATIONS:
        return as_flash(FAMILIES[family].make("sdpa"), attn)
    return FAMILIES[family].make(attn)
