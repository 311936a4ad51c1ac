"""Per-layer routing (ALVTS): a layer runs on text + its selected visual rows; the rest skip it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.base import Schedule
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
    """Every text/padding/pinned row, and each item's top-k visual rows by score.

    Ties go to the earlier row (stable sort), so the choice is deterministic. Shapes are known on
    the host (k per item, positions cached per level), so no device sync happens per layer.
    """
    routing = schedule.routing
    keep = (level.item < 0) | level.pinned
    pinned, _ = level.fixed_counts()
    visual_per_row, slots = list(pinned), []
    for rows, item in zip(level.rows, items):
        batch_row, positions, pinned_positions = rows.batch_row, rows.unpinned, rows.pinned
        k = schedule.count(lambda n: routing.keep(layer, n), item.budget_tokens, positions.numel())
        chosen = positions[scores[batch_row, positions].argsort(descending=True, stable=True)[:k]]
        keep[batch_row, chosen] = True
        slots.append(level.slot[batch_row, torch.cat([chosen, pinned_positions])].sort().values)
        visual_per_row[batch_row] += k
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


def route_selection(keep: torch.Tensor) -> RowSelection:
    return compact_rows(keep)
