"""LLaVA-1.5 (`llava`): stage 1 on the vision tower's selected-layer features, before the projector."""
from __future__ import annotations

from typing import Any

import torch

from ..runtime.hooks import HookSet
from ..runtime.port import FamilyPort
from ..runtime.state import VisualItem
from .base import Family, VisionLayer, keep_mask, scatter_rows, square_grid


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
    return VisionLayer(layer=layers[index], output=layers[index], cls=cls)


class LlavaFamily(Family):
    """The projector receives (I, N, D_vision) features (CLS already removed by the default strategy).

    A pre-hook on the projector reduces them to (I, k, D_vision) (a merging method merges in that space), a
    post-hook puts the projected (I, k, D_text) rows back at their places in a zero (I, N, D_text)
    tensor so the model's placeholder check holds; the language model's entry then drops the rows
    that were not kept.
    """

    model_types = ("llava",)

    def nominal_tokens(self, config: Any) -> int | None:
        vision = config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n if config.vision_feature_select_strategy == "default" else n + 1

    def install_vision_side(self, model: torch.nn.Module, port: FamilyPort, hooks: HookSet) -> None:
        pending: list = []

        def reduce(module, args, kwargs):
            features = args[0] if args else kwargs["image_features"]
            port.begin_items("image")
            pending.clear()
            count, n = features.shape[:2]
            keep = port.keep(n)
            plans = port.plan_items(list(features), [keep] * count)
            for plan in plans:
                kept = plan.kept_index[0] if plan is not None else torch.arange(n, device=features.device)
                port.add_item(VisualItem("image", keep_mask(kept, n), grid=square_grid(n)))
            if plans[0] is None:
                return None
            pending.append((plans, n))
            reduced = torch.cat([plan.apply(x[None]) for plan, x in zip(plans, features)])
            return (reduced,) + tuple(args[1:]), kwargs

        def restore(module, args, kwargs, output):
            if not pending:
                return None
            plans, n = pending.pop()
            kept_index = torch.cat([plan.kept_index for plan in plans])
            return scatter_rows(output, kept_index, n)

        hooks.pre(model.model.multi_modal_projector, reduce)
        hooks.post(model.model.multi_modal_projector, restore)

    def vision_feature_layer(self, model: torch.nn.Module) -> VisionLayer:
        config = model.config
        return clip_feature_layer(model.model.vision_tower, config.vision_feature_layer, config.vision_feature_select_strategy)
