"""LLaVA-OneVision (`llava_onevision`), images: AnyRes like LLaVA-NeXT (see `llava_next.AnyResFamily`).

Differences from LLaVA-NeXT handled here: in a prompt with several images (`batch_num_images` > 1)
each image is one base crop plus one newline; `vision_aspect_ratio="anyres_max_K"` interpolates the
unpadded tile grid of large images down to about K crops' worth of tokens after the projector (those
tile tokens are reduced after packing, in the projected space). Videos: the model pools each frame's
projected tokens 2x (bilinear) and appends one newline after the last frame; each frame is reduced on
its own after that pooling, in the projected space (`video.pooled_video_wrapper`), the newline pinned.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from transformers.models.llava_onevision import modeling_llava_onevision

from ..runtime.hooks import HookSet
from ..runtime.port import FamilyPort
from .llava_next import AnyResFamily
from .video import pooled_video_wrapper


def max_tiles_of(vision_aspect_ratio: str) -> int:
    """K of an "anyres_max_K" vision_aspect_ratio; ValueError for any other form."""
    match = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if match is None:
        raise ValueError(
            f"vision_aspect_ratio {vision_aspect_ratio!r} is not of the form 'anyres_max_K' that LLaVA-OneVision uses"
        )
    return int(match.group(1))


class LlavaOnevisionFamily(AnyResFamily):
    """LLaVA-OneVision: SigLIP tower (no CLS), AnyRes crops, `anyres_max_K` packing with image newlines."""

    model_types = ("llava_onevision",)
    helpers = modeling_llava_onevision

    def _crop_plan(self, model: torch.nn.Module, arguments: dict) -> tuple[list[int], int | None]:
        crops, _ = super()._crop_plan(model, arguments)
        per_sample = arguments.get("batch_num_images")
        if per_sample is not None:
            single = [int(n) == 1 for n in per_sample for _ in range(int(n))]
            crops = [count if alone else 1 for count, alone in zip(crops, single)]
        ratio = arguments.get("vision_aspect_ratio") or model.config.vision_aspect_ratio
        return crops, max_tiles_of(ratio)

    def token_ids(self, config: Any) -> dict[str, int]:
        return {"image": config.image_token_id, "video": config.video_token_id}

    def _wrap_other_encoders(self, model: torch.nn.Module, port: FamilyPort, hooks: HookSet) -> None:
        """Videos: each frame reduced after the model's 2x bilinear pooling, the trailing newline pinned."""
        wrapper = pooled_video_wrapper(port, trail=1, why="interpolated from the selected layer's rows")
        hooks.wrap_method(model.model, "get_video_features", wrapper)

    def vision_feature_layer(self, model: torch.nn.Module) -> None:
        raise ValueError(
            "this method reads the attention of the vision encoder layer behind each visual feature, and LLaVA-OneVision "
            "interpolates the tile tokens of large images after the projector, so they are no encoder layer's rows"
        )

    def check(self, model: torch.nn.Module) -> None:
        super().check(model)
        max_tiles_of(model.config.vision_aspect_ratio)
