"""Model families, found by `config.model_type`."""
from __future__ import annotations

import torch

from .base import Family, ModelParts
from .llava import LlavaFamily
from .llava_next import LlavaNextFamily
from .llava_next_video import LlavaNextVideoFamily
from .llava_onevision import LlavaOnevisionFamily
from .qwen_vl import Qwen3VLFamily, QwenVLFamily
from .video_llava import VideoLlavaFamily

FAMILIES: tuple[Family, ...] = (
    LlavaFamily(), LlavaNextFamily(), LlavaOnevisionFamily(), QwenVLFamily(), Qwen3VLFamily(), VideoLlavaFamily(),
    LlavaNextVideoFamily(),
)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(model: torch.nn.Module) -> Family:
    """The family of a transformers VLM instance; ValueError naming the supported types otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"tokensieve does not support model_type {model_type!r} ({type(model).__name__}); "
        f"supported model_types: {', '.join(supported_model_types())}"
    )


__all__ = ["FAMILIES", "Family", "ModelParts", "family_for", "supported_model_types"]
