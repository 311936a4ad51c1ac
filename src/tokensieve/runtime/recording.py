"""What a compressed prefill records in `handle.stats`: counts per layer, kept tokens, FLOPs and plans."""
from __future__ import annotations

import torch

from ..flops import Widths
from .sequence import RowSelection
from .state import Level, Stats, VisualItem


def original_positions(selection: RowSelection, positions: torch.Tensor) -> torch.Tensor:
    """(B, S_new): the input position each kept row came from, -1 at the padding rows the selection adds."""
    return selection.gather(positions, 1).masked_fill(~selection.valid, -1)


def new_stats(num_layers: int, selection: RowSelection, length: int, items: list[VisualItem], batch_rows: list[int],
              vision_flops: int, vision_plans: list, text_config) -> Stats:
    """The record of a prefill of `length` input rows as it enters the language model: what the vision
    side kept, its FLOPs and plans, and where each row came from; per-layer counts follow as layers run."""
    batch = selection.gather_index.shape[0]
    inputs = torch.arange(length, device=selection.gather_index.device)[None].expand(batch, -1)
    return Stats(
        tokens_per_layer=torch.zeros(batch, num_layers, dtype=torch.long),
        rows_per_layer=torch.zeros(batch, num_layers, dtype=torch.long),
        kept=[{"stage1": it.keep.nonzero().flatten()} for it in items],
        rows=batch_rows,
        items=items,
        selection_flops=vision_flops,
        plans=vision_plans,
        widths=Widths.of(text_config),
        positions=original_positions(selection, inputs),
    )


def record_layer(stats: Stats, index: int, level: Level) -> None:
    """The visual rows and all rows each batch row holds as decoder layer `index` runs on `level`."""
    stats.tokens_per_layer[:, index], stats.rows_per_layer[:, index] = level.counts()


def record_route(stats: Stats, index: int, level: Level, visual_per_row: list[int], slots: list[torch.Tensor]) -> None:
    """A routed layer processed `visual_per_row` visual rows; `slots` are the ones it chose, per item."""
    visual, rows = level.counts()
    routed = torch.tensor(visual_per_row)
    stats.tokens_per_layer[:, index] = routed
    stats.rows_per_layer[:, index] = rows - visual + routed
    for kept, chosen in zip(stats.kept, slots):
        kept[f"layer{index}"] = chosen


def record_stage(stats: Stats, name: str, level: Level, requests: list, plans: list, flops: int) -> None:
    """A reduction before a decoder layer left `level`: its plans, FLOPs, kept slots and row positions."""
    stats.plans += [((name, r.positions.numel(), r.keep), p.kept_index[0]) for r, p in zip(requests, plans)]
    stats.selection_flops += flops
    stats.positions = original_positions(level.selection, stats.positions)
    for rows, item_kept in zip(level.rows, stats.kept):
        item_kept[name] = level.slot[rows.batch_row, torch.cat([rows.unpinned, rows.pinned])].sort().values
