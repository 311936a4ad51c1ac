"""Reductions before a decoder layer: each item's rows are planned by the stage and the sequence
narrows to a new level from that layer on."""
from __future__ import annotations

from typing import Any

import torch

from .recording import record_stage
from .schedule import DecoderStage, StageContext, StageRequest
from .state import Level, VisualItem


class StageRunner:
    """Runs a schedule's decoder stages at prefill; `session` holds the sequence's levels and stats."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def run(self, stage: DecoderStage, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Reduce the visual rows before layer `index`: a new level; returns its hidden states."""
        session = self.session
        state = session.sequence
        level = state.levels[-1]
        rotary = kwargs["position_embeddings"]
        if level is not state.levels[0]:
            rotary = tuple(session.layers.narrow_from_level0(level, t, -2) for t in rotary)
        context = StageContext(
            layer=index, hidden=hidden, rotary=rotary, item=level.item,
            valid=level.selection.valid & level.mask.bool(), layers=session.parts.layers,
            norm=getattr(session.parts.language_model, "norm", None),
            previous=session.previous_input if stage.reads_previous_layer else None, cache={},
        )
        requests = self._requests(stage, level, state.items)
        plans = stage.plan(context, requests) if requests else []
        keep, hidden, kept_positions = self._apply(level, hidden, requests, plans)
        kept_spans = [{} for _ in state.items]
        for request, kept in zip(requests, kept_positions):
            kept_spans[request.item][request.span] = kept
        next_level = level.narrowed(keep, index, kept_spans)
        state.levels.append(next_level)
        state.applied.add(stage.name)
        flops = 0 if stage.flops is None else sum(stage.flops(r.positions.numel(), r.keep, hidden.shape[-1]) for r in requests)
        record_stage(session.stats, stage.name, next_level, requests, plans, flops)
        session.previous_input = None
        return next_level.selection.gather(hidden, 1)

    def _requests(self, stage: DecoderStage, level: Level, items: list[VisualItem]) -> list[StageRequest]:
        """One request per item segment with more unpinned visual rows than the stage keeps."""
        requests = []
        for i, (item, rows) in enumerate(zip(items, level.rows)):
            for span, ((_, _, budget_tokens), positions) in enumerate(zip(item.spans(), rows.spans)):
                schedule = self.session.schedule
                target = schedule.count_noting_floor(stage.keep, budget_tokens, positions.numel(), item.floored,
                                                     stage.name)
                if target < positions.numel():
                    requests.append(StageRequest(i, rows.batch_row, positions, target, span))
        return requests

    @staticmethod
    def _apply(level: Level, hidden: torch.Tensor, requests: list[StageRequest], plans: list):
        """keep (B, S) bool, hidden states whose kept rows hold the plans' outputs where they merge, and
        the positions each request kept."""
        keep = torch.ones(level.item.shape, dtype=torch.bool, device=hidden.device)
        hidden = hidden.clone()
        kept = []
        for request, plan in zip(requests, plans):
            plan = plan.to(hidden.device)
            kept_positions = request.positions[plan.kept_index[0]]
            keep[request.row, request.positions] = False
            keep[request.row, kept_positions] = True
            if plan.weights is not None:
                hidden[request.row, kept_positions] = plan.apply(hidden[request.row, request.positions][None])[0]
            kept.append(kept_positions)
        return keep, hidden, kept
