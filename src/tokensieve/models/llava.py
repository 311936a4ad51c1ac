"""LLaVA-1.5 (`llava`): stage 1 on the vision tower's selected-layer features, before the projector."""
from __future__ import annotations

from typing import Any

import torch

from ..runtime.hooks import HookSet
from ..runtime.state import VisualItem
from .base import Family, keep_mask, scatter_rows, square_grid


class LlavaFamily(Family):
    """The projector receives (I, N, D_vision) features (CLS already removed by the default strategy).

    A pre-hook on the projector reduces them to (I, k, D_vision) (ApET merges in that space), a
    post-hook puts the projected (I, k, D_text) rows back at their places in a zero (I, N, D_text)
    tensor so the model's placeholder check holds; the language model's entry then drops the rows
    that were not kept.
    """

    model_types = ("llava",)
    apet_defaults = {"basis_blend": 1.0}

    def nominal_tokens(self, config: Any) -> int | None:
        vision = config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n if config.vision_feature_select_strategy == "default" else n + 1

    def install_stage1(self, model: torch.nn.Module, session: Any, hooks: HookSet) -> None:
        pending: list = []

        def reduce(module, args, kwargs):
            features = args[0] if args else kwargs["image_features"]
            session.begin_items("image")
            pending.clear()
            count, n = features.shape[:2]
            keep = session.stage1_keep(n)
            plans = session.plan_items(list(features), [keep] * count)
            for plan in plans:
                kept = plan.kept_index[0] if plan is not None else torch.arange(n, device=features.device)
                session.add_item(VisualItem("image", keep_mask(kept, n), grid=square_grid(n)))
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
