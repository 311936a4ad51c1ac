"""Keeping the highest-scoring tokens, with a deterministic tie rule."""
from __future__ import annotations

import torch

from .plan import ReductionPlan, selection_plan


def top_scores(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` highest scores of each row, ties to the first index.

    Args:
        scores: (G, n); keep: 0 <= keep <= n.
    Returns:
        (G, keep) long, ascending: the kept indices in original order.
    """
    order = scores.argsort(dim=1, descending=True, stable=True)
    return order[:, :keep].sort(dim=1).values


def top_scores_plan(scores: torch.Tensor, keep: int) -> ReductionPlan:
    """A selection plan keeping the `keep` highest scores of each row of scores (G, n)."""
    return selection_plan(top_scores(scores, keep))
