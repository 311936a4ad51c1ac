"""LLaVA-NeXT (`llava_next`, AnyRes): stage 1 per crop, before the projector; image newlines pinned.

The model encodes each image as crops (a base view, then the AnyRes tiles), projects them, and packs
them (`pack_image_features`): the base crop's tokens, then the tiles stitched into one grid, with the
padding of the resized image cut away ("unpadding") and one image-newline token after every grid row.
This file holds what LLaVA-OneVision shares with it (`AnyResFamily`, `packed_layout`, `split_keep`).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers.models.llava_next import modeling_llava_next

from ..runtime.hooks import HookSet
from ..runtime.port import FamilyPort
from ..runtime.state import VisualItem
from .base import Family, ReducedPart, reduce_parts
from .llava import clip_feature_layer, clip_feature_rows
from .vision_attention import VisionLayer


# ---------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class PackedLayout:
    """Where one image's crop tokens land among its P packed placeholder tokens.

    Attributes:
        position: (C, N) long: packed index of each crop token; -1 where unpadding cuts it away, and for
            every tile token of a `resized` image (no tile token has a packed place of its own there).
        newline: (P,) bool: the image-newline tokens.
        resized: (P,) bool: tile tokens the model makes by interpolating the unpadded tile grid after
            the projector (LLaVA-OneVision's `anyres_max_K`); all False when there is no such step.
    """

    position: torch.Tensor
    newline: torch.Tensor
    resized: torch.Tensor

    @property
    def length(self) -> int:
        return self.newline.numel()

    @property
    def budget_tokens(self) -> int:
        """Packed tokens that are not image newlines."""
        return self.length - int(self.newline.sum())


def packed_layout(
    crop_side: int,
    crops: int,
    image_size: Sequence[int],
    grid_pinpoints: list,
    crop_pixels: int,
    max_tiles: int | None = None,
    helpers: Any = modeling_llava_next,
) -> PackedLayout:
    """The packing geometry of one image, computed on index tensors (no features needed).

    Mirrors `pack_image_features`: a single crop gives its N tokens and one newline; otherwise the base
    crop's N tokens come first, then the (gh * side, gw * side) grid of tile tokens, unpadded to the
    image's aspect ratio (transformers' own `unpad_image`, on an index grid), row by row, each row
    followed by one newline. With `max_tiles` (OneVision) a grid of more than 1.1**2 * max_tiles crops'
    worth of tokens is interpolated down to (int(h // r), int(w // r)), r = sqrt(h * w / (max_tiles * N)).

    Args:
        crop_side: tokens along one side of a crop (vision image_size // patch_size); N = crop_side**2.
        crops: crops of this image (1, or 1 + gh * gw).
        image_size: the image's original (height, width).
        grid_pinpoints: the config's AnyRes resolutions.
        crop_pixels: the vision tower's image_size.
        max_tiles: K of OneVision's vision_aspect_ratio "anyres_max_K"; None for LLaVA-NeXT.
        helpers: the transformers module whose `get_anyres_image_grid_shape` / `unpad_image` the model uses.
    """
    n = crop_side * crop_side
    if crops == 1:
        newline = torch.zeros(n + 1, dtype=torch.bool)
        newline[n] = True
        return PackedLayout(torch.arange(n)[None], newline, torch.zeros(n + 1, dtype=torch.bool))
    size = [int(s) for s in image_size]
    grid_h, grid_w = helpers.get_anyres_image_grid_shape(size, grid_pinpoints, crop_pixels)
    if crops != 1 + grid_h * grid_w:
        raise RuntimeError(
            f"an image of size {size} has {crops} crops but its {grid_h}x{grid_w} AnyRes grid needs {1 + grid_h * grid_w}"
        )
    index = torch.arange((crops - 1) * n).view(grid_h, grid_w, crop_side, crop_side)
    index = index.permute(0, 2, 1, 3).reshape(1, grid_h * crop_side, grid_w * crop_side)
    kept = helpers.unpad_image(index, size)[0]  # (h, w): tile-token index of each unpadded grid cell
    rows, cols = kept.shape
    ratio = math.sqrt(rows * cols / (max_tiles * n)) if max_tiles is not None else 0.0
    resized = ratio > 1.1
    if resized:
        rows, cols = int(rows // ratio), int(cols // ratio)
    length = n + rows * (cols + 1)
    newline = torch.zeros(length, dtype=torch.bool)
    newline[n + torch.arange(rows) * (cols + 1) + cols] = True
    position = torch.full((crops, n), -1, dtype=torch.long)
    position[0] = torch.arange(n)
    if not resized:
        cells = n + torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)[None]
        position[1:].view(-1)[kept.flatten()] = cells.flatten()
    resized_mask = torch.zeros(length, dtype=torch.bool)
    if resized:
        resized_mask[n:] = ~newline[n:]
    return PackedLayout(position, newline, resized_mask)


def split_keep(keep: int, sizes: Sequence[int], minimum: int) -> list[int]:
    """Split an image's stage-1 keep over its parts (crops) in proportion to their token counts.

    Largest-remainder rounding; every part keeps at least min(size, minimum) and at most its size.
    The keeps sum to exactly `keep` unless those floors alone exceed it; then each part keeps its floor.

    Args:
        keep: tokens the image keeps.
        sizes: token count of each part.
        minimum: fewest tokens the method can reduce a part to (`Schedule.min_keep`).
    """
    if keep >= sum(sizes):
        return list(sizes)
    floors = [min(size, minimum) for size in sizes]
    if sum(floors) >= keep:
        return floors
    fixed: dict[int, int] = {}
    while True:
        free = [i for i, size in enumerate(sizes) if i not in fixed and size > 0]
        left = keep - sum(fixed.values())
        total = sum(sizes[i] for i in free)
        low = [i for i in free if left * sizes[i] < floors[i] * total]  # quota below the floor
        if not low:
            break
        fixed.update({i: floors[i] for i in low})
    counts = [fixed.get(i, 0) for i in range(len(sizes))]
    for i in free:
        counts[i] = left * sizes[i] // total
    by_remainder = sorted(free, key=lambda i: (-(left * sizes[i] % total), i))
    for i in by_remainder[: left - sum(counts[i] for i in free)]:
        counts[i] += 1
    return counts


# ---------------------------------------------------------------------------------------- one encoding
@dataclass
class _Part:
    """Tokens of one image reduced together.

    crop: global crop index (vision-space part) or None (the resized tile grid, reduced after packing).
    index: (n,) long: crop-token indices (vision space) or packed positions (resized grid).
    keep: tokens the part keeps; kept: (k,) long indices into `index`, once planned.
    """

    crop: int | None
    index: torch.Tensor
    keep: int
    kept: torch.Tensor | None = None


@dataclass
class _Image:
    layout: PackedLayout
    first_crop: int
    parts: list[_Part]


@dataclass
class _Encoding:
    """The images of one `get_image_features` call, from the projector's hook to the packing."""

    images: list[_Image]
    crop_tokens: int
    strategy: str  # vision_feature_select_strategy: which rows of the feature layer the crop tokens are

    @property
    def crops(self) -> int:
        return sum(image.layout.position.shape[0] for image in self.images)


class AnyResFamily(Family):
    """Shared by LLaVA-NeXT and LLaVA-OneVision.

    Hooks (all on `model.model`): `get_image_features` is wrapped to learn the image sizes and plan
    every image's packed layout; a pre-hook on `multi_modal_projector` reduces each crop's (N, D_vision)
    selected-layer features (only the tokens that survive unpadding) and hands the projector the
    (C, N, D_vision) features with each reduced crop's output at its kept rows and zeros at the rest;
    the wrapped `pack_image_features` then marks each image's kept packed tokens and the image
    newlines and records one VisualItem per image.

    Budget: an image's budget counts its packed tokens that are not newlines (base crop + unpadded
    tiles, as the language model sees them); its stage-1 keep is split over its crops in proportion
    to the tokens each contributes (`split_keep`). Newline tokens are always kept and pinned.
    Where the model interpolates the tile grid after the projector (OneVision `anyres_max_K` on large
    images), the tiles cannot be reduced in the vision space; the interpolated tile tokens are then
    reduced after packing, in the projected space, as one part.
    """

    helpers: Any = modeling_llava_next

    # ------------------------------------------------------------------ per-family details
    def _crop_plan(self, model: torch.nn.Module, arguments: dict) -> tuple[list[int], int | None]:
        """(crops of each image, max_tiles) for one get_image_features call."""
        config = model.config
        grid = self.helpers.get_anyres_image_grid_shape
        shapes = [grid(size, config.image_grid_pinpoints, config.vision_config.image_size) for size in arguments["image_sizes"]]
        return [1 + h * w for h, w in shapes], None

    def _wrap_other_encoders(self, model: torch.nn.Module, port: FamilyPort, hooks: HookSet) -> None:
        """Wrap the family's other encoders (videos), where it has any."""

    # ------------------------------------------------------------------ Family interface
    def check(self, model: torch.nn.Module) -> None:
        outer = getattr(model, "model", None)
        for name in ("multi_modal_projector", "image_newline", "get_image_features", "pack_image_features"):
            if not hasattr(outer, name):
                raise ValueError(f"{type(model).__name__} has no model.{name}; is it a {self.model_types[0]} model?")
        if not isinstance(model.config.image_grid_pinpoints, list):
            raise ValueError("config.image_grid_pinpoints must be a list of [height, width] resolutions")

    def install_vision_side(self, model: torch.nn.Module, port: FamilyPort, hooks: HookSet) -> None:
        outer = model.model
        state: dict[str, _Encoding | None] = {"encoding": None}
        hooks.wrap_method(outer, "get_image_features", lambda fn: self._encode_wrapper(model, port, state, fn))
        hooks.pre(outer.multi_modal_projector, lambda m, a, k: self._reduce(port, state["encoding"], a, k))
        hooks.wrap_method(outer, "pack_image_features", lambda fn: self._pack_wrapper(port, state, fn))
        self._wrap_other_encoders(model, port, hooks)

    # ------------------------------------------------------------------ get_image_features
    def _encode_wrapper(self, model, port, state: dict, original: Callable) -> Callable:
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            port.begin_items("image")
            state["encoding"] = self._plan_encoding(model, port, arguments)
            try:
                return original(*args, **kwargs)
            finally:
                state["encoding"] = None

        return wrapper

    def _plan_encoding(self, model, port, arguments: dict) -> _Encoding:
        """Layouts and per-crop keeps of every image in this call."""
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        crops, max_tiles = self._crop_plan(model, arguments)
        images, first = [], 0
        for size, count in zip(arguments["image_sizes"], crops):
            layout = packed_layout(side, count, size.tolist() if torch.is_tensor(size) else size,
                                   model.config.image_grid_pinpoints, vision.image_size, max_tiles, self.helpers)
            images.append(_Image(layout, first, self._parts(port, layout, first)))
            first += count
        return _Encoding(images, side * side, model.config.vision_feature_select_strategy)

    @staticmethod
    def _parts(port, layout: PackedLayout, first_crop: int) -> list[_Part]:
        """The image's parts (each crop's surviving tokens, or the resized tile grid) with their keeps."""
        parts = []
        for crop in range(layout.position.shape[0]):
            index = (layout.position[crop] >= 0).nonzero().flatten()
            if index.numel():
                parts.append(_Part(first_crop + crop, index, 0))
        if layout.resized.any():
            parts.append(_Part(None, layout.resized.nonzero().flatten(), 0))
        keep = port.keep(layout.budget_tokens)
        keeps = split_keep(keep, [p.index.numel() for p in parts], port.min_keep)
        for part, part_keep in zip(parts, keeps):
            part.keep = part_keep
        return parts

    # ------------------------------------------------------------------ projector hook
    @staticmethod
    def _reduce(port, encoding: _Encoding | None, args: tuple, kwargs: dict):
        """Pre-hook: (C, N, D_vision) features -> the same, each reduced crop part at its kept rows.

        Crop tokens cut by unpadding and the tiles of resized images (interpolated after the projector,
        reduced after packing) are left as they are.
        """
        if encoding is None:
            return None
        features = args[0] if args else kwargs["image_features"]
        if features.shape[0] != encoding.crops or features.shape[1] != encoding.crop_tokens:
            raise RuntimeError(
                f"the projector received features of shape {tuple(features.shape)}, expected {encoding.crops} crops of "
                f"{encoding.crop_tokens} tokens; this vision tower / vision_feature_select_strategy pair is not supported"
            )
        parts = [p for image in encoding.images for p in image.parts if p.crop is not None]
        sources = None
        if port.reads_vision_attention:
            sources = [clip_feature_rows(torch.tensor(p.crop), p.index, encoding.crop_tokens, encoding.strategy) for p in parts]
        inputs = [features[p.crop, p.index.to(features.device)] for p in parts]
        reduced = reduce_parts(port, inputs, [p.keep for p in parts], "image", sources)
        features = AnyResFamily._write_parts(features, parts, inputs, reduced)
        if features is None:
            return None
        return ((features,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "image_features": features})

    @staticmethod
    def _write_parts(features: torch.Tensor, parts: list[_Part], inputs: list[torch.Tensor],
                     reduced: list[ReducedPart]) -> torch.Tensor | None:
        """Record each part's kept tokens; (C, N, D) features with the reduced parts written in, or
        None when no part was reduced."""
        for part, result in zip(parts, reduced):
            part.kept = result.keep(torch.device("cpu")).nonzero().flatten()
        if all(result.plan is None for result in reduced):
            return None
        features = features.clone()
        for part, x, result in zip(parts, inputs, reduced):
            if result.plan is not None:
                features[part.crop, part.index.to(features.device)] = result.apply(x)
        return features

    # ------------------------------------------------------------------ packing
    def _pack_wrapper(self, port, state: dict, original: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            features, lengths = original(*args, **kwargs)
            encoding = state["encoding"]
            if encoding is None:
                return features, lengths
            self._check_lengths(encoding, features)
            features = self._reduce_resized(port, encoding, list(features))
            for image, packed in zip(encoding.images, features):
                port.add_item(self._item(image, packed))
            return features, lengths

        return wrapper

    @staticmethod
    def _check_lengths(encoding: _Encoding, features: Sequence[torch.Tensor]) -> None:
        """RuntimeError unless every packed (P, D_text) image has the length its layout predicts."""
        for image, packed in zip(encoding.images, features):
            if packed.shape[0] != image.layout.length:
                raise RuntimeError(
                    f"the model packed an image into {packed.shape[0]} tokens, the layout computed for it has "
                    f"{image.layout.length}; this transformers version packs differently"
                )

    @staticmethod
    def _reduce_resized(port, encoding: _Encoding, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Reduce the interpolated tile tokens of resized images in the projected space.

        features: per image, its (P, D_text) packed tokens; returns them with the kept rows replaced.
        """
        members = [(i, p) for i, image in enumerate(encoding.images) for p in image.parts if p.crop is None]
        inputs = [features[i][p.index.to(features[i].device)] for i, p in members]
        reduced = reduce_parts(port, inputs, [p.keep for _, p in members])
        for (i, part), x, result in zip(members, inputs, reduced):
            part.kept = result.keep(torch.device("cpu")).nonzero().flatten()
            if result.plan is not None:
                features[i] = features[i].index_copy(0, part.index.to(features[i].device), result.apply(x))
        return features

    @staticmethod
    def _item(image: _Image, packed: torch.Tensor) -> VisualItem:
        """One image's VisualItem over its P packed tokens: kept tokens and newlines kept, newlines pinned."""
        layout = image.layout
        keep = layout.newline.clone()
        for part in image.parts:
            chosen = part.index[part.kept]
            keep[chosen if part.crop is None else layout.position[part.crop - image.first_crop, chosen]] = True
        return VisualItem("image", keep.to(packed.device), pinned=layout.newline.to(packed.device))


class LlavaNextFamily(AnyResFamily):
    """LLaVA-NeXT (LLaVA-1.6): CLIP tower, AnyRes crops, `spatial_unpad` packing with image newlines."""

    model_types = ("llava_next",)

    def vision_feature_layer(self, model: torch.nn.Module) -> VisionLayer:
        config = model.config
        return clip_feature_layer(model.model.vision_tower, config.vision_feature_layer, config.vision_feature_select_strategy)
