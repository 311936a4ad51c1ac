"""DivPrune's greedy max-min diversity selection (the pure maths; the method is methods/divprune.py)."""
from __future__ import annotations

import torch


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between every pair of tokens, in float32.

    Args:
        x: (B, N, D) tokens.
    Returns:
        (B, N, N) float32; row i, column j is the distance between tokens i and j.
    """
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    return 1.0 - unit @ unit.transpose(1, 2)


def divprune_select(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy max-min diversity: the `keep` tokens of each item that are farthest from each other.

    The first pick is the token whose nearest other token is farthest (the largest nearest-neighbour
    distance); each next pick is the unselected token whose distance to the selected set (its
    minimum distance to a selected token) is largest. Distances are 1 - cosine in float32; ties go
    to the first index.

    Args:
        x: (B, N, D) tokens; keep: tokens to keep, 1 <= keep <= N.
    Returns:
        (B, keep) long, ascending: the kept token indices.
    """
    batch, n = x.shape[:2]
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}], got {keep}")
    distances = cosine_distances(x)  # (B, N, N)
    selected = torch.zeros(batch, n, dtype=torch.bool, device=x.device)
    rows = torch.arange(batch, device=x.device)
    nearest = distances.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf")).amin(dim=2)
    pick = nearest.argmax(dim=1)  # (B,): the token whose nearest neighbour is farthest
    to_set = distances[rows, pick]  # (B, N): each token's distance to the selected set
    picks = [pick]
    for _ in range(keep - 1):
        selected[rows, pick] = True
        pick = to_set.masked_fill(selected, float("-inf")).argmax(dim=1)
        to_set = torch.minimum(to_set, distances[rows, pick])
        picks.append(pick)
    return torch.stack(picks, dim=1).sort(dim=1).values


def divprune_flops(n: int, keep: int, dim: int) -> int:
    """FLOPs of one divprune_select on n tokens of width dim: normalising, the N x N cosine matrix,
    the nearest-neighbour minimum and the greedy updates."""
    return 3 * n * dim + 2 * n * n * dim + n * n + 2 * keep * n
