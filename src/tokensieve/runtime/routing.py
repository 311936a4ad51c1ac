"""Per-layer routing: a layer runs on text + its selected visual rows; the rest skip it unchanged."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .compat import cache_in
from .recording import record_route
from .schedule import Schedule
from .sequence import RowSelection, compact_rows
from .state import Level, VisualItem


@dataclass
class Route:
    """One layer's choice at prefill: keep (B, S_l) over its level's rows, and the compacted rows."""

    keep: torch.Tensor
    selection: RowSelection
    full_hidden: torch.Tensor | None = None  # the layer's whole input, until its output is scattered
    slots: list[torch.Tensor] | None = None  # kept slots of each item (None for a held choice)
    visual_per_row: list[int] | None = None
    padded: bool = True  # whether the compacted rows hold padding (known on the host)


@dataclass
class Choice:
    """A routed layer's choice: keep (B, S) over the level's rows, the kept slots of each item
    (sorted, on the model's device), and the visual rows each batch row routes (Python ints)."""

    keep: torch.Tensor
    slots: list[torch.Tensor]
    visual_per_row: list[int]


def top_rows(scores: torch.Tensor, level: Level, items: list[VisualItem], layer: int, schedule: Schedule) -> Choice:
    """Every text/padding/pinned row, and the top-k visual rows by score of each item's segment (an
    image, or one video frame: k from the segment's own budget tokens, so a video keeps frames x the
    per-frame count).

    Ties go to the earlier row (stable sort), so the choice is deterministic. Shapes are known on
    the host (k per segment, positions cached per level), so no device sync happens per layer.
    """
    budget = lambda n: schedule.routing.keep(layer, n)  # noqa: E731
    keep = (level.item < 0) | level.pinned
    pinned, _ = level.fixed_counts()
    visual_per_row, slots = list(pinned), []
    for rows, item in zip(level.rows, items):
        chosen = []
        for (_, _, budget_tokens), positions in zip(item.spans(), rows.spans):
            k = schedule.count_noting_floor(budget, budget_tokens, positions.numel(), item.floored, f"layer{layer}")
            chosen.append(positions[scores[rows.batch_row, positions].argsort(descending=True, stable=True)[:k]])
            visual_per_row[rows.batch_row] += k
        chosen = torch.cat(chosen)
        keep[rows.batch_row, chosen] = True
        slots.append(level.slot[rows.batch_row, torch.cat([chosen, rows.pinned])].sort().values)
    return Choice(keep, slots, visual_per_row)


def extend_keep(keep: torch.Tensor, length: int) -> torch.Tensor:
    """A held prefill choice (B, S) extended with True for rows appended since: (B, length)."""
    extra = torch.ones(keep.shape[0], length - keep.shape[1], dtype=torch.bool, device=keep.device)
    return torch.cat([keep, extra], dim=1)


def scatter_back(full: torch.Tensor, output: torch.Tensor, selection: RowSelection) -> torch.Tensor:
    """Write a layer's output rows (B, S', D) over its full input (B, S, D) at the selected rows.

    Padding slots of the selection write to one spare row past the end, dropped after: no boolean
    indexing, whose data-dependent shape would make the host wait for the device.
    """
    batch, length, width = full.shape
    rows = torch.arange(batch, device=full.device)[:, None] * length + selection.gather_index  # (B, S') flat row
    rows = rows.masked_fill(~selection.valid, batch * length)
    merged = torch.cat([full.reshape(batch * length, width), full.new_empty(1, width)])
    merged.index_copy_(0, rows.flatten(), output.reshape(-1, width))
    return merged[: batch * length].view(batch, length, width)


class Router:
    """The pre- and post-hooks of the routed layers (present only when the schedule routes)."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def route(self, index: int, layer, level: Level, hidden: torch.Tensor, args, kwargs: dict, prefill: bool):
        session = self.session
        cache = cache_in(kwargs)
        if not prefill:
            route = session.routes[index]
            mask = session.layers.decode_mask(hidden, route.selection.gather_mask(level.mask), cache, index)
            return args, {**kwargs, "attention_mask": mask}
        route = self._choose(index, layer, level, hidden, kwargs)
        session.routes[index] = route
        selection = route.selection
        narrowed = selection.gather(hidden, 1)
        out = dict(kwargs)
        out["attention_mask"] = session.layers.causal_mask(narrowed, selection.gather_mask(level.mask), cache, index, route.padded)
        out["position_embeddings"] = tuple(selection.gather(t, -2) for t in kwargs["position_embeddings"])
        if kwargs.get("position_ids") is not None:
            out["position_ids"] = selection.gather(kwargs["position_ids"], -1)
        record_route(session.stats, index, level, route.visual_per_row, route.slots)
        return ((narrowed,) + tuple(args[1:]), out) if args else (args, {**out, "hidden_states": narrowed})

    def _choose(self, index: int, layer, level: Level, hidden: torch.Tensor, kwargs: dict) -> Route:
        session = self.session
        held = session.routes.get(index) if session.hold_routes else None
        if held is not None and held.keep.shape[1] <= level.length:
            extra = level.length - held.keep.shape[1]
            keep = extend_keep(held.keep, level.length)
            return Route(keep, compact_rows(keep, held.selection.length + extra), hidden, held.slots, held.visual_per_row,
                         held.padded)
        routing = session.schedule.routing
        valid = level.selection.valid & level.mask.bool()
        _, rows = level.counts()
        items_per_row = session.stats.items_per_row(len(rows))
        scores = routing.score(index, layer, hidden, kwargs["position_embeddings"], level.item, valid, max(items_per_row))
        if routing.flops is not None:
            session.stats.selection_flops += sum(
                routing.flops(index, session.stats.widths, r, n) for r, n in zip(rows.tolist(), items_per_row))
        choice = top_rows(scores, level, session.sequence.items, index, session.schedule)
        pinned, fixed = level.fixed_counts()
        lengths = [f + v - p for f, v, p in zip(fixed, choice.visual_per_row, pinned)]  # rows each batch row routes
        padded = level.padded() or min(lengths) < max(lengths)
        return Route(choice.keep, compact_rows(choice.keep, max(lengths)), hidden, choice.slots, choice.visual_per_row,
                     padded)

    def post_hook(self, index: int):
        def hook(module, args, kwargs, output):
            route = self.session.routes.get(index)
            sequence = self.session.sequence
            if sequence is None or sequence.decoded > 0 or route is None or route.full_hidden is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            merged = scatter_back(route.full_hidden, hidden, route.selection)
            route.full_hidden = None
            return (merged,) + tuple(output[1:]) if isinstance(output, tuple) else merged
        return hook
