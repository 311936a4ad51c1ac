"""LLaVA-NeXT-Video (`llava_next_video`): images as LLaVA-NeXT (AnyRes, see `llava_next.AnyResFamily`);
videos as pooled frames.

A video's frames go through the vision tower and the selected-layer features are pooled
(`vision_resampler`, 2x2 by default: 576 -> 144 tokens per frame) and projected; the language model
receives the frames one after another, with no newline and no CLS. Each frame is reduced on its own
after the projector (`video.pooled_video_wrapper`): the budget counts the pooled tokens a frame hands
the language model. The pooled rows are averages of several vision-layer rows, so a method that
reads the vision encoder's attention (VisionZip) is refused on videos; it runs on images.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.models.llava_next_video import modeling_llava_next_video

from ..runtime.hooks import HookSet
from ..runtime.port import FamilyPort
from .llava_next import LlavaNextFamily
from .video import pooled_video_wrapper


class LlavaNextVideoFamily(LlavaNextFamily):
    """LLaVA-NeXT-Video: a CLIP tower shared by images (AnyRes crops) and video frames (pooled)."""

    model_types = ("llava_next_video",)
    helpers = modeling_llava_next_video

    def token_ids(self, config: Any) -> dict[str, int]:
        return {"image": config.image_token_id, "video": config.video_token_id}

    def _wrap_other_encoders(self, model: torch.nn.Module, port: FamilyPort, hooks: HookSet) -> None:
        wrapper = pooled_video_wrapper(port, trail=0, why="pooled from several of the selected layer's rows")
        hooks.wrap_method(model.model, "get_video_features", wrapper)
