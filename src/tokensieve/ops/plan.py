"""A token reduction as a linear map, computed once and applied to every aligned tensor."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReductionPlan:
    """Which tokens survive a reduction and what each surviving slot becomes.

    Attributes:
        kept_index: (G, T) long, ascending: the original position of each output slot.
        weights: (G, T, N) float32 or None. Output slot t is sum_n weights[t, n] * x[n]; None means
            plain selection (slot t is x[kept_index[t]]).
    """

    kept_index: torch.Tensor
    weights: torch.Tensor | None = None

    def row(self, g: int) -> "ReductionPlan":
        """The plan of item g alone: kept_index (1, T), weights (1, T, N) or None."""
        return ReductionPlan(self.kept_index[g : g + 1], None if self.weights is None else self.weights[g : g + 1])

    def to(self, device: torch.device) -> "ReductionPlan":
        return ReductionPlan(self.kept_index.to(device), None if self.weights is None else self.weights.to(device))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Reduce x (G, N, D) to (G, T, D) in x's dtype (weighted sums in float32)."""
        if self.weights is None:
            return x.gather(1, self.kept_index[..., None].expand(-1, -1, x.shape[-1]))
        return (self.weights @ x.float()).to(x.dtype)


def selection_plan(kept_index: torch.Tensor) -> ReductionPlan:
    """A plan that only keeps the given tokens: kept_index (G, T), sorted ascending here."""
    return ReductionPlan(kept_index=kept_index.sort(dim=1).values)
