"""Per decoder layer: run a reduction due before it, hand it the rows, mask, rotary tables and
position ids of its level, and route it when the schedule routes."""
from __future__ import annotations

from typing import Any

import torch

from .compat import cache_in, causal_mask, runs_flash, without_packing_hint
from .recording import record_layer
from .state import Level


class LayerHooks:
    """The pre-hook of every decoder layer; `session` holds the prefill's levels and the collaborators."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def pre_hook(self, index: int):
        def hook(module, args, kwargs):
            session = self.session
            state = session.sequence
            if state is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            prefill = state.decoded == 0
            stage = session.schedule.stage_at(index)
            if prefill and stage is not None and stage.name not in state.applied:
                hidden = session.stages.run(stage, index, hidden, kwargs)
                args, kwargs = ((hidden,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            level = state.level_of(index)
            if prefill:
                if hidden.shape[1] != level.length:
                    raise RuntimeError(f"layer {index} received {hidden.shape[1]} rows, expected {level.length}")
                record_layer(session.stats, index, level)
            if level is not state.levels[0]:
                kwargs = self._narrow_kwargs(index, level, hidden, kwargs, prefill)
            if runs_flash(session.parts.text_config):
                kwargs = without_packing_hint(kwargs)
            following = session.schedule.stage_at(index + 1)
            if prefill and following is not None and following.reads_previous_layer:
                session.previous_input = (hidden, kwargs.get("position_embeddings"))
            if session.router is not None and index >= session.schedule.routing.start_layer:
                return session.router.route(index, module, level, hidden, args, kwargs, prefill)
            return args, kwargs
        return hook

    def _narrow_kwargs(self, index: int, level: Level, hidden: torch.Tensor, kwargs: dict, prefill: bool):
        if index == level.first_layer:
            level.layer_mask = self._layer_mask(level, hidden, cache_in(kwargs), prefill)
        out = dict(kwargs)
        out["attention_mask"] = level.layer_mask
        if prefill:
            rotary = kwargs.get("position_embeddings")
            if rotary is not None:
                if level.rotary is None or level.rotary[0] is not rotary:
                    level.rotary = (rotary, tuple(self.narrow_from_level0(level, t, -2) for t in rotary))
                out["position_embeddings"] = level.rotary[1]
            if kwargs.get("position_ids") is not None:
                out["position_ids"] = self.narrow_from_level0(level, kwargs["position_ids"], -1)
        return out

    def narrow_from_level0(self, level: Level, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        levels = self.session.sequence.levels
        for step in levels[1 : levels.index(level) + 1]:
            x = step.selection.gather(x, seq_dim)
        return x

    def _layer_mask(self, level: Level, hidden: torch.Tensor, cache: Any, prefill: bool):
        """The 4-D mask of a level's layers; at prefill its padding is known on the host."""
        if prefill:
            return self.causal_mask(hidden, level.mask, cache, level.first_layer, level.padded())
        return self.decode_mask(hidden, level.mask, cache, level.first_layer)

    def decode_mask(self, hidden: torch.Tensor, prompt_mask: torch.Tensor, cache: Any, layer: int):
        """The 4-D mask of a decoding step over these prompt columns (B, S_l) and the new ones. The
        caller's new columns are not read back, so the mask is built whether or not it pads."""
        mask = torch.cat([prompt_mask, self.session.sequence.new_columns.to(prompt_mask.dtype)], dim=1)
        return self.causal_mask(hidden, mask, cache, layer, padded=True)

    def causal_mask(self, hidden: torch.Tensor, mask: torch.Tensor, cache: Any, layer: int, padded: bool | None = None):
        return causal_mask(self.session.parts.text_config, hidden, mask, cache, layer, padded)
