"""Video-LLaVA (`video_llava`): images and videos, each from its own CLIP tower, share one projector.

Both are reduced where LLaVA-1.5 reduces its images: on the selected-layer features, before the
projector (a merging method merges in that space; the projector then maps the kept rows). The
family wraps `get_image_features` / `get_video_features` on the instance to know which modality (and
how many frames) the projector's next call carries, and a pre-hook on the projector reduces it:

- images as LLaVA-1.5 (`llava.reduce_images`): one item per image;
- videos: the projector receives (V * F, R, D_vision) rows, where each frame's first row is its CLS
  token (Video-LLaVA hands it to the language model whatever the image strategy). Every frame is
  reduced on its own (`video.reduce_videos`), its CLS pinned: always kept and never counted, so
  `budget=32` keeps 32 of a frame's 256 patches plus its CLS. One item per video, one segment per frame.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..runtime.hooks import HookSet
from ..runtime.port import FamilyPort
from .base import Family
from .llava import clip_feature_layer, reduce_images
from .video import FrameLayout, reduce_videos
from .vision_attention import LayerAttention


class VideoLlavaFamily(Family):
    """Video-LLaVA: `image_tower` and `video_tower` (CLIP), one `multi_modal_projector`."""

    model_types = ("video_llava",)

    def token_ids(self, config: Any) -> dict[str, int]:
        return {"image": config.image_token_id, "video": config.video_token_id}

    def nominal_tokens(self, config: Any) -> int | None:
        """Budget tokens of an image (default strategy) and of a frame: the patches of one view."""
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def check(self, model: torch.nn.Module) -> None:
        outer = getattr(model, "model", None)
        for name in ("image_tower", "video_tower", "multi_modal_projector", "get_image_features", "get_video_features"):
            if not hasattr(outer, name):
                raise ValueError(f"{type(model).__name__} has no model.{name}; is it a video_llava model?")

    def install_vision_side(self, model: torch.nn.Module, port: FamilyPort, hooks: HookSet) -> None:
        outer = model.model
        encoding: dict[str, Any] = {"modality": None, "frames": 0}
        hooks.wrap_method(outer, "get_image_features", lambda fn: _encoding_wrapper(fn, encoding, "image"))
        hooks.wrap_method(outer, "get_video_features", lambda fn: _encoding_wrapper(fn, encoding, "video"))

        def reduce(module, args, kwargs):
            modality = encoding["modality"]
            if modality is None:
                return None  # a projector call outside the two encoders: left alone
            features = args[0] if args else kwargs["image_features"]  # (I or V * F, R, D_vision)
            if modality == "image":
                reduced = reduce_images(port, features, model.config)
            else:
                reduced = _reduce_video_rows(port, features, encoding["frames"], _has_cls(outer.video_tower))
            if reduced is None:
                return None
            return ((reduced,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "image_features": reduced})

        hooks.pre(outer.multi_modal_projector, reduce)

    def vision_attention(self, model: torch.nn.Module) -> LayerAttention:
        """The selected layer of both towers (the same layer index, read the same way); each tower runs
        right before its features reach the projector, so the reading is always the one behind them.
        ValueError for several feature layers, or for images whose strategy hands CLS on as a feature."""
        config, outer = model.config, model.model
        image = clip_feature_layer(outer.image_tower, config.vision_feature_layer, config.vision_feature_select_strategy)
        video = clip_feature_layer(outer.video_tower, config.vision_feature_layer, "default")  # CLS pinned, not budgeted
        return LayerAttention(image, also=(video.layer,))


def _has_cls(tower: torch.nn.Module) -> bool:
    body = getattr(tower, "vision_model", tower)
    return hasattr(body.embeddings, "class_embedding")


def _encoding_wrapper(original: Callable, encoding: dict, modality: str) -> Callable:
    """get_{modality}_features, noting the modality (and a video's frame count) for the projector's hook."""

    def wrapper(*args, **kwargs):
        frames = 0
        if modality == "video":
            pixels = kwargs.get("pixel_values_videos", args[0] if args else None)  # (V, F, C, H, W)
            frames = pixels.shape[1]
        encoding.update(modality=modality, frames=frames)
        try:
            return original(*args, **kwargs)
        finally:
            encoding.update(modality=None, frames=0)

    return wrapper


def _reduce_video_rows(port: FamilyPort, features: torch.Tensor, frames: int, cls: bool) -> torch.Tensor | None:
    """(V * F, R, D_vision) frame rows (CLS first when `cls`) -> the same, each frame reduced on its own."""
    rows = features.shape[1]
    layout = FrameLayout(frames=frames, rows=rows, lead=int(cls))
    sources = None
    if port.reads_vision_attention:
        def sources(v: int, f: int) -> torch.Tensor:
            return (v * frames + f) * rows + layout.lead + torch.arange(rows - layout.lead)
    videos = features.unflatten(0, (-1, frames))
    reduced = reduce_videos(port, videos, layout, sources)
    return None if reduced is videos else reduced.flatten(0, 1)
