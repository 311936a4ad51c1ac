"""Helpers every method shares: budget validation, budget arithmetic and batched planning.

The form a method compiles to (`Schedule` and its stages) lives in `tokensieve.runtime.schedule`."""
from __future__ import annotations

import numbers
from typing import Any, Callable

import torch

from ..ops.plan import ReductionPlan
from ..runtime.schedule import StageRequest, groups_of_equal_size


def grouped_plans(requests: list[StageRequest], features: Callable[[StageRequest], torch.Tensor],
                  plan: Callable[[torch.Tensor, int], ReductionPlan]) -> list[ReductionPlan]:
    """Plans for requests, computed in batches of equal (n, keep): plan(x (G, n, D), keep)."""
    plans: list[Any] = [None] * len(requests)
    sizes = lambda i: (requests[i].positions.numel(), requests[i].keep)  # noqa: E731
    for (_, keep), members in groups_of_equal_size(range(len(requests)), sizes).items():
        batch = plan(torch.stack([features(requests[i]) for i in members]), keep)
        for j, i in enumerate(members):
            plans[i] = batch.row(j)
    return plans


def type_name(value: Any) -> str:
    return type(value).__name__


def is_int(value: Any) -> bool:
    """An int (numpy integers too), not a bool: token counts, layer indices, ranks, seeds."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An int or float (numpy scalars too), not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def check_type(name: str, value: Any, accepts: Callable[[Any], bool], what: str, optional: bool = False) -> None:
    """TypeError naming the field and what to pass unless accepts(value) (or value is None, when optional).

    Example: check_type("layer", 2.0, is_int, "a decoder layer index such as 2") raises
    "layer must be a decoder layer index such as 2, got 2.0 (float)".
    """
    if optional and value is None:
        return
    if not accepts(value):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type_name(value)})")


def check_budget(budget: Any, ratio: Any) -> None:
    """Budget xor ratio, each a real number in its range: TypeError for another type, ValueError for
    a value out of range or both given."""
    check_type("budget", budget, is_real, "a number of visual tokens such as 64", optional=True)
    check_type("ratio", ratio, is_real, "a fraction of the visual tokens such as 0.25", optional=True)
    if budget is not None and ratio is not None:
        raise ValueError("give either budget (tokens) or ratio (fraction of the visual tokens), not both")
    if budget is not None and not budget > 0:
        raise ValueError(f"budget must be a positive number of visual tokens such as 64, got {budget}")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], e.g. 0.25 for a quarter of the visual tokens; got {ratio}")


def first_layers(count: int) -> str:
    """The first `count` decoder layers in words: "layer 0", "layers 0..3" ("no layer" for 0)."""
    if count <= 0:
        return "no layer"
    return "layer 0" if count == 1 else f"layers 0..{count - 1}"


def check_stage_layer(layer: int, num_layers: int) -> None:
    """ValueError unless 1 <= layer < num_layers (a stage before layer 0 or after the last is no stage)."""
    if num_layers < 2:
        raise ValueError(
            f"a {num_layers}-layer model has no layer after the first to reduce before; this method needs at least "
            "2 decoder layers"
        )
    if not 1 <= layer < num_layers:
        raise ValueError(f"layer must be in [1, {num_layers - 1}] for a {num_layers}-layer model, got {layer}")


def check_ratio_reachable(method: str, ratio: float | None, layer: int, num_layers: int, fix: str) -> None:
    """ValueError when a ratio below 1 cannot be met because every token passes the layers before `layer`."""
    if ratio is not None and ratio < 1 and ratio * num_layers <= layer:
        raise ValueError(
            f"{method} cannot reach ratio={ratio:g} on a {num_layers}-layer model: every visual token passes through "
            f"{first_layers(layer)}, a mean of at least {layer / num_layers:.3f} of them; {fix}"
        )


def tokens_after(mean: float, first: float, layer: int, num_layers: int) -> float:
    """Tokens per layer from `layer` on such that the mean over all layers is `mean`, when the layers
    before it process `first` tokens each (unrounded; may be below 1 when the budget is too small)."""
    return (mean * num_layers - first * layer) / (num_layers - layer)


def mean_budget(budget: float | None, ratio: float | None, n: int) -> float:
    """Mean visual tokens per decoder layer wanted for an item of n tokens (never above n)."""
    wanted = budget if budget is not None else ratio * n
    return min(float(wanted), float(n))


def kept_tokens(budget: float | None, ratio: float | None, n: int) -> int:
    """Tokens an item of n keeps when every layer sees the same count: the budget rounded, at most n."""
    return min(n, round(mean_budget(budget, ratio, n)))
