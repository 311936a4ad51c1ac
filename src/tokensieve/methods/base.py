"""What every method hands the runtime: where it reduces and how many tokens each stage keeps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..ops.plan import ReductionPlan

PlanFn = Callable[[torch.Tensor, int, str], ReductionPlan]


@dataclass(frozen=True)
class Routing:
    """Per-layer selection: before each layer from start_layer on, the layer processes its own
    choice of visual tokens; the others skip it unchanged (ALVTS).

    Attributes:
        start_layer: first routed decoder layer (earlier layers process every token).
        keep: (layer, n) -> visual tokens that layer processes of an item whose budget counts n.
        score: (layer index, layer module, hidden (B, S, D), rotary (cos, sin), item (B, S),
            valid (B, S)) -> (B, S) scores of the visual rows; the top-`keep` of each item run.
    """

    start_layer: int
    keep: Callable[[int, int], int]
    score: Callable[..., torch.Tensor]
    flops: Callable[..., int] | None = None  # (layer, Widths, rows scored, items) -> FLOPs


@dataclass(frozen=True)
class Schedule:
    """A method resolved for one model.

    Attributes:
        num_layers: decoder layers L.
        stage1_keep: n -> tokens stage 1 keeps of an item whose budget counts n tokens (n = untouched).
        stage2_layer: first decoder layer that sees the stage-2 reduction (None: no stage 2).
        stage2_keep: n -> tokens stage 2 keeps of an item whose budget counts n tokens.
        plan: (x (G, N, D), keep, stage name) -> ReductionPlan of G items of N tokens each.
        min_keep: fewest tokens a stage may keep of an item it reduces.
        routing: per-layer selection (ALVTS), or None.
        plan_flops: (n, keep, width) -> FLOPs of one item's plan, for the selection's share.
    """

    num_layers: int
    stage1_keep: Callable[[int], int]
    stage2_layer: int | None
    stage2_keep: Callable[[int], int] | None
    plan: PlanFn | None
    min_keep: int = 1
    routing: Routing | None = None
    plan_flops: Callable[[int, int, int], int] | None = None  # (n, keep, width) -> FLOPs of one plan

    def check_item(self, n: int) -> None:
        """ValueError if a stage would have to keep fewer than min_keep of an item's n tokens."""
        stages = [("stage 1", self.stage1_keep(n))]
        if self.stage2_keep is not None:
            stages.append(("stage 2", self.stage2_keep(n)))
        if self.routing is not None:
            for layer in range(self.routing.start_layer, self.num_layers):
                stages.append((f"layer {layer}", self.routing.keep(layer, n)))
        for name, keep in stages:
            if keep < n and keep < self.min_keep:
                raise ValueError(
                    f"{name} would keep {keep} of {n} visual tokens, below this method's minimum of "
                    f"{self.min_keep}; raise the budget"
                )

    def tokens_per_layer(self, n: int) -> list[int]:
        """Visual tokens each decoder layer processes for one item of n budget tokens."""
        first = self.stage1_keep(n)
        counts = [first] * self.num_layers
        if self.stage2_layer is not None and self.stage2_keep is not None:
            second = min(first, self.stage2_keep(n))
            counts[self.stage2_layer :] = [second] * (self.num_layers - self.stage2_layer)
        if self.routing is not None:
            for layer in range(self.routing.start_layer, self.num_layers):
                counts[layer] = min(counts[layer], self.routing.keep(layer, n))
        return counts


def check_budget(budget: float | None, ratio: float | None) -> None:
    """Budget xor ratio, each in its range; ValueError otherwise."""
    if budget is not None and ratio is not None:
        raise ValueError("give either budget (tokens) or ratio (fraction of the visual tokens), not both")
    if budget is not None and not budget > 0:
        raise ValueError(f"budget must be a positive number of visual tokens, got {budget}")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")


def mean_budget(budget: float | None, ratio: float | None, n: int) -> float:
    """Mean visual tokens per decoder layer wanted for an item of n tokens (never above n)."""
    wanted = budget if budget is not None else ratio * n
    return min(float(wanted), float(n))
