"""LLaVA-1.5 (`llava`): the vision side on the vision tower's selected-layer features, before the projector."""
from __future__ import annotations

from typing import Any

import torch

from ..runtime.hooks import HookSet
from ..runtime.port import FamilyPort
from ..runtime.state import VisualItem
from .base import Family, reduce_parts, square_grid
from .vision_attention import VisionLayer


def clip_feature_layer(tower: torch.nn.Module, feature_layer: Any, strategy: str) -> VisionLayer:
    """The CLIP/SigLIP encoder layer whose output is `hidden_states[feature_layer]` (LLaVA's features).

    hidden_states[0] is the embeddings and hidden_states[i] the output of layer i - 1, so -2 of 24 layers
    is layer 22. ValueError for several feature layers, the embeddings, or a CLS token handed on as a feature.
    """
    if not isinstance(feature_layer, int):
        raise ValueError(
            f"reading the vision attention needs one feature layer; this model concatenates layers {feature_layer}"
        )
    body = getattr(tower, "vision_model", tower)  # a *VisionModel wraps the *VisionTransformer
    layers = body.encoder.layers
    index = feature_layer % (len(layers) + 1) - 1
    if index < 0:
        raise ValueError(
            "reading the vision attention needs an encoder layer; vision_feature_layer selects the patch embeddings"
        )
    cls = hasattr(body.embeddings, "class_embedding")
    if cls and strategy != "default":
        raise ValueError(
            "reading the CLS token's attention needs it left out of the features, but "
            f"vision_feature_select_strategy={strategy!r} hands it to the language model as a feature; use 'default'"
        )
    return VisionLayer(layer=layers[index], cls=cls)


def clip_feature_rows(crops: torch.Tensor, tokens: torch.Tensor, crop_tokens: int, strategy: str) -> torch.Tensor:
    """Rows of the feature layer's (C, S, D) output, flattened, that crop crops[i]'s feature tokens[i]
    is: the "default" strategy drops each crop's first row (CLIP's CLS), so S = crop_tokens + 1.

    crops, tokens: (n,) long (or broadcastable). Returns (n,) long.
    """
    skipped = 1 if strategy == "default" else 0
    return crops * (crop_tokens + skipped) + skipped + tokens


def reduce_images(port: FamilyPort, features: torch.Tensor, config: Any) -> torch.Tensor | None:
    """One encoding of LLaVA-1.5 images: (I, N, D_vision) selected-layer features -> the same shape with
    each image's plan output at its kept rows and zeros elsewhere (None when no image was reduced), and
    one VisualItem per image recorded. A method reading the vision attention finds the features' rows
    of the feature layer through `config.vision_feature_select_strategy`."""
    port.begin_items("image")
    count, n = features.shape[:2]
    sources = None
    if port.reads_vision_attention:
        strategy = config.vision_feature_select_strategy
        sources = [clip_feature_rows(torch.tensor(i), torch.arange(n), n, strategy) for i in range(count)]
    parts = reduce_parts(port, list(features), [port.keep(n)] * count, "image", sources)
    for part in parts:
        port.add_item(VisualItem("image", part.keep(features.device), grid=square_grid(n)))
    if all(part.plan is None for part in parts):
        return None
    return torch.stack([part.apply(x) for part, x in zip(parts, features)])


class LlavaFamily(Family):
    """The projector receives (I, N, D_vision) features (CLS already removed by the default strategy).

    A pre-hook on the projector reduces each image (a merging method merges in that space) and hands
    the projector the result at the kept rows, zeros elsewhere, so the model's placeholder check
    holds; the language model's entry then drops the rows that were not kept.
    """

    model_types = ("llava",)

    def nominal_tokens(self, config: Any) -> int | None:
        vision = config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n if config.vision_feature_select_strategy == "default" else n + 1

    def install_vision_side(self, model: torch.nn.Module, port: FamilyPort, hooks: HookSet) -> None:
        def reduce(module, args, kwargs):
            features = args[0] if args else kwargs["image_features"]  # (I, N, D_vision)
            reduced = reduce_images(port, features, model.config)
            if reduced is None:
                return None
            return ((reduced,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "image_features": reduced})

        hooks.pre(model.model.multi_modal_projector, reduce)

    def vision_feature_layer(self, model: torch.nn.Module) -> VisionLayer:
        config = model.config
        return clip_feature_layer(model.model.vision_tower, config.vision_feature_layer, config.vision_feature_select_strategy)
