"""ApET's operator: keep the tokens a few basis tokens cannot reconstruct, merge the rest into them.

How it works and the choices it makes: docs/methods.md, "The ApET operator" (arXiv 2602.19870).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .approximation import approximation_error
from .fps import farthest_point_sample
from .plan import ReductionPlan


def _validate(x: torch.Tensor, keep: int, num_basis: int, basis_blend: float) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, D), got shape {tuple(x.shape)}")
    num_tokens = x.shape[1]
    if num_basis < 1:
        raise ValueError(f"num_basis must be at least 1, got {num_basis}")
    if not num_basis + 1 <= keep <= num_tokens:
        raise ValueError(
            f"keep must be in [num_basis + 1, N] = [{num_basis + 1}, {num_tokens}], got {keep}; "
            "raise the budget or lower num_basis"
        )
    if not 0.0 <= basis_blend <= 1.0:
        raise ValueError(f"basis_blend must be in [0, 1], got {basis_blend}")


def _nearest_anchor(x: torch.Tensor, anchor_index: torch.Tensor) -> torch.Tensor:
    """For every token, the position (into anchor_index) of its cosine-nearest anchor: (B, N)."""
    unit = F.normalize(x.float(), dim=-1)
    anchors = unit.gather(1, anchor_index[..., None].expand(-1, -1, unit.shape[-1]))
    return (unit @ anchors.transpose(1, 2)).argmax(dim=-1)


def apet_plan(
    x: torch.Tensor,
    keep: int,
    num_basis: int = 10,
    eps: float = 1e-5,
    basis_blend: float = 1.0,
    merge: bool = True,
    start: int | torch.Tensor | None = None,
) -> ReductionPlan:
    """The ApET reduction of x as a linear map (see `apet_reduce` for the rule).

    Args:
        x: (B, N, D) token features.
    Returns:
        A ReductionPlan with kept_index (B, keep) ascending and weights (B, keep, N).
    """
    _validate(x, keep, num_basis, basis_blend)
    batch, num_tokens, _ = x.shape
    basis_index = farthest_point_sample(x, num_basis, start=start)  # (B, k) in pick order
    error = approximation_error(x, basis_index, eps=eps)  # (B, N)
    by_error = error.argsort(dim=1, descending=True, stable=True)[:, :keep]  # (B, keep)
    anchor_index = by_error[:, : keep - num_basis]  # high-error tokens, (B, keep - k)
    slot_index = by_error[:, keep - num_basis :].sort(dim=1).values  # basis slots, ascending position
    rows = torch.arange(batch, device=x.device)[:, None]

    # weights over original positions, one row per output token (rows ordered as by_error for now)
    weights = torch.zeros(batch, keep, num_tokens, device=x.device)
    anchor_rows = torch.arange(keep - num_basis, device=x.device).expand(batch, -1)
    weights[rows, anchor_rows, anchor_index] = 1.0
    if merge:
        dropped = torch.ones(batch, num_tokens, dtype=torch.bool, device=x.device)
        dropped[rows, by_error] = False
        target = _nearest_anchor(x, anchor_index)  # (B, N)
        weights[rows.expand_as(target), target, torch.arange(num_tokens, device=x.device)] += dropped.float()
        weights[:, : keep - num_basis] /= weights[:, : keep - num_basis].sum(-1, keepdim=True)
    slot_rows = torch.arange(keep - num_basis, keep, device=x.device).expand(batch, -1)
    weights[rows, slot_rows, slot_index] += 1.0 - basis_blend
    weights[rows, slot_rows, basis_index] += basis_blend

    output_position = torch.cat([anchor_index, slot_index], dim=1)  # (B, keep)
    order = output_position.argsort(dim=1)
    kept_index = output_position.gather(1, order)
    weights = weights.gather(1, order[..., None].expand(-1, -1, num_tokens))
    return ReductionPlan(kept_index=kept_index, weights=weights)


def apet_reduce(
    x: torch.Tensor,
    keep: int,
    num_basis: int = 10,
    eps: float = 1e-5,
    basis_blend: float = 1.0,
    merge: bool = True,
    start: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce N tokens to `keep` by approximation error (ApET; docs/methods.md, "The ApET operator").

    1. `num_basis` basis tokens by farthest point sampling (first pick: `start`).
    2. Each token's ridge reconstruction error from the basis (float32).
    3. Keep the `keep` tokens of largest error.
    4. The `num_basis` kept slots of lowest error become `basis_blend * basis + (1 - basis_blend) * own`,
       the i-th FPS pick going to the i-th such slot in ascending position.
    5. If `merge`, every dropped token is averaged (plain mean) into its cosine-nearest anchor, the
       anchors being the other kept tokens; basis slots receive nothing.

    Args:
        x: (B, N, D) token features, any float dtype (maths in float32).
        keep: tokens to keep, num_basis + 1 <= keep <= N; keep == N returns x unchanged.
    Returns:
        reduced (B, keep, D) in x's dtype, in original order, and kept_index (B, keep) ascending.
    """
    if x.dim() == 3 and keep == x.shape[1]:
        _validate(x, keep, num_basis, basis_blend)
        index = torch.arange(keep, device=x.device).expand(x.shape[0], -1)
        return x, index
    plan = apet_plan(x, keep, num_basis=num_basis, eps=eps, basis_blend=basis_blend, merge=merge, start=start)
    return plan.apply(x), plan.kept_index
