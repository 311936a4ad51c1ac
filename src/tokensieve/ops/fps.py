"""Farthest point sampling over token features."""
from __future__ import annotations

import torch


def default_start(x: torch.Tensor) -> torch.Tensor:
    """The documented first pick when none is given: the token farthest from the token mean.

    Args:
        x: (B, N, D) token features, any float dtype.
    Returns:
        (B,) long index of each batch row's token with the largest squared distance to the row mean
        (computed in float32; ties go to the lowest index).
    """
    xf = x.float()
    dist = (xf - xf.mean(dim=1, keepdim=True)).pow(2).sum(-1)
    return dist.argmax(dim=1)


def _start_index(x: torch.Tensor, start: int | torch.Tensor | None) -> torch.Tensor:
    batch, num_tokens = x.shape[:2]
    if start is None:
        return default_start(x)
    if isinstance(start, int):  # checked on the host
        if not 0 <= start < num_tokens:
            raise ValueError(f"start indices must lie in [0, {num_tokens}), got {start}")
        return torch.full((batch,), start, dtype=torch.long, device=x.device)
    index = torch.as_tensor(start, dtype=torch.long, device=x.device)
    if index.dim() == 0:
        index = index.expand(batch)
    if index.shape != (batch,):
        raise ValueError(f"start must be an int or a ({batch},) tensor, got shape {tuple(index.shape)}")
    if bool(((index < 0) | (index >= num_tokens)).any()):
        raise ValueError(f"start indices must lie in [0, {num_tokens}), got {index.tolist()}")
    return index


def farthest_point_sample(x: torch.Tensor, k: int, start: int | torch.Tensor | None = None) -> torch.Tensor:
    """Pick k tokens per row, each the farthest (squared Euclidean, float32) from those already picked.

    Args:
        x: (B, N, D) token features.
        k: number of picks, 1 <= k <= N.
        start: index of the first pick, an int or a (B,) tensor; None picks the token farthest
            from the row mean (see `default_start`).
    Returns:
        (B, k) long indices in pick order. Ties go to the lowest index.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, D), got shape {tuple(x.shape)}")
    batch, num_tokens, _ = x.shape
    if not 1 <= k <= num_tokens:
        raise ValueError(f"k must be in [1, {num_tokens}] for {num_tokens} tokens, got {k}")
    xf = x.float()
    picks = torch.empty(batch, k, dtype=torch.long, device=x.device)
    picks[:, 0] = _start_index(x, start)
    rows = torch.arange(batch, device=x.device)
    min_dist = torch.full((batch, num_tokens), float("inf"), device=x.device)
    for i in range(1, k):
        last = xf[rows, picks[:, i - 1]]  # (B, D)
        dist = (xf - last[:, None, :]).pow(2).sum(-1)
        min_dist = torch.minimum(min_dist, dist)
        picks[:, i] = min_dist.argmax(dim=1)
    return picks
