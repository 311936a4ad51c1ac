"""What every method hands the runtime: where it reduces, how many tokens each stage keeps, and how."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..ops.plan import ReductionPlan

PlanFn = Callable[[torch.Tensor, int, str], ReductionPlan]


class BudgetUnreachable(ValueError):
    """A method's budget cannot be met on an item of this size: the layers before its first reduction
    already spend more than the mean allows. `compress` raises it for the model's nominal item; inside
    a batch, a smaller item keeps the method's minimum instead (`Schedule.count`)."""


@dataclass(frozen=True)
class Routing:
    """Per-layer selection: before each layer from start_layer on, the layer processes its own
    choice of visual tokens; the others skip it unchanged (ALVTS).

    Attributes:
        start_layer: first routed decoder layer (earlier layers process every token).
        keep: (layer, n) -> visual tokens that layer processes of an item whose budget counts n.
        score: (layer index, layer module, hidden (B, S, D), rotary (cos, sin), item (B, S),
            valid (B, S), most items in one batch row (int, known on the host)) -> (B, S) scores of
            the visual rows; the top-`keep` of each item run.
        flops: (layer, Widths, rows scored, items) -> FLOPs of one scoring, or None.
    """

    start_layer: int
    keep: Callable[[int, int], int]
    score: Callable[..., torch.Tensor]
    flops: Callable[..., int] | None = None


@dataclass(frozen=True)
class StageRequest:
    """One item (or video frame) a stage must reduce: its rows `positions` (n,) of batch row `row`
    in the current sequence, to `keep` rows; `span` numbers the frame among the item's spans."""

    item: int
    row: int
    positions: torch.Tensor
    keep: int
    span: int = 0


@dataclass
class StageContext:
    """What a stage before decoder layer `layer` may read (prefill only).

    Attributes:
        layer: index of the first layer that sees the reduced sequence (0: before the first layer).
        hidden: (B, S, D) the input of that layer (the output of layer - 1).
        rotary: (cos, sin), each (B or 1, S, d): position embeddings of these rows.
        item: (B, S) long visual item per row (-1 text); valid: (B, S) bool, False at padding.
        layers: the decoder layers; norm: the language model's final norm.
        previous: (hidden (B, S, D), rotary) that layer - 1 received, when the stage asked for it.
        cache: per-stage scratch space a plan function may fill (e.g. an attention row computed once).
    """

    layer: int
    hidden: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor]
    item: torch.Tensor
    valid: torch.Tensor
    layers: torch.nn.ModuleList
    norm: torch.nn.Module | None = None
    previous: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
    cache: dict | None = None


@dataclass(frozen=True)
class InnerStage:
    """A permanent reduction of the visual rows inside the language model, before decoder layer `layer`.

    Attributes:
        layer: first decoder layer that sees the reduced sequence (0: before the first layer, i.e.
            on the projected visual tokens).
        keep: n -> visual tokens an item (or video frame) whose budget counts n keeps after it.
        plan: (StageContext, requests) -> one ReductionPlan per request: kept_index (1, k) into the
            request's positions and optional weights (1, k, n) that merge the rows' hidden states.
        name: the key of the kept indices in `handle.stats.kept`.
        reads_previous_layer: the runtime keeps the input of layer - 1 for `StageContext.previous`.
        reads_last_token: the plan reads the last position's attention, so no row may end in padding
            (checked once when the prefill enters the language model, before any decoder layer).
        flops: (n, keep, width) -> FLOPs of one request's plan, or None.
        vision_side: the plan reads only each request's own rows of `hidden` (no text, no layer), so
            a stage before layer 0 may run on the vision side instead (where a family needs it).
    """

    layer: int
    keep: Callable[[int], int]
    plan: Callable[[StageContext, list[StageRequest]], list[ReductionPlan]]
    name: str = "stage2"
    reads_previous_layer: bool = False
    flops: Callable[[int, int, int], int] | None = None
    reads_last_token: bool = False
    vision_side: bool = False


def grouped_plans(requests: list[StageRequest], features: Callable[[StageRequest], torch.Tensor],
                  plan: Callable[[torch.Tensor, int], ReductionPlan]) -> list[ReductionPlan]:
    """Plans for requests, computed in batches of equal (n, keep): plan(x (G, n, D), keep)."""
    plans: list[Any] = [None] * len(requests)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault((request.positions.numel(), request.keep), []).append(i)
    for (_, keep), members in groups.items():
        batch = plan(torch.stack([features(requests[i]) for i in members]), keep)
        for j, i in enumerate(members):
            plans[i] = batch.row(j)
    return plans


@dataclass(frozen=True)
class Schedule:
    """A method resolved for one model.

    Attributes:
        num_layers: decoder layers L.
        stage1_keep: n -> tokens the vision-side stage 1 keeps of an item whose budget counts n
            (n = untouched).
        plan: (x (G, N, D), keep, stage name) -> ReductionPlan for the vision-side stage 1, or None.
        stages: reductions inside the language model, in layer order.
        min_keep: fewest tokens a stage may keep of an item it reduces.
        routing: per-layer selection (ALVTS), or None.
        plan_flops: (n, keep, width) -> FLOPs of one item's stage-1 plan, for the selection's share.
        install: (model, family, hooks) -> None, or None: places the method's own hooks (e.g. a
            capture of a vision layer's attention) with the session's HookSet, before any other
            hook; a ValueError from it leaves nothing installed.
    """

    num_layers: int
    stage1_keep: Callable[[int], int]
    plan: PlanFn | None = None
    stages: tuple[InnerStage, ...] = ()
    min_keep: int = 1
    routing: Routing | None = None
    plan_flops: Callable[[int, int, int], int] | None = None
    install: Callable[[Any, Any, Any], None] | None = None

    @property
    def stage2_layer(self) -> int | None:
        """The first inner stage's layer (None without one)."""
        return self.stages[0].layer if self.stages else None

    @property
    def stage2_keep(self) -> Callable[[int], int] | None:
        return self.stages[0].keep if self.stages else None

    def stage_at(self, layer: int) -> InnerStage | None:
        return next((stage for stage in self.stages if stage.layer == layer), None)

    def check_item(self, n: int) -> None:
        """ValueError if a stage would have to keep fewer than min_keep of an item's n tokens."""
        checks = [("stage 1", self.stage1_keep(n))] + [(stage.name, stage.keep(n)) for stage in self.stages]
        if self.routing is not None:
            checks += [(f"layer {layer}", self.routing.keep(layer, n)) for layer in range(self.routing.start_layer, self.num_layers)]
        for name, keep in checks:
            if keep < n and keep < self.min_keep:
                raise ValueError(
                    f"{name} would keep {keep} of {n} visual tokens, below this method's minimum of "
                    f"{self.min_keep}; raise the budget"
                )

    @staticmethod
    def asked(keep: Callable[[int], int], budget_tokens: int, rows: int) -> int:
        """What a stage's budget asks it to keep of `rows` for an item of `budget_tokens` (at most
        `rows`; 0 where the method says that budget cannot be met at this size)."""
        try:
            return min(rows, keep(budget_tokens))
        except BudgetUnreachable:
            return 0

    def count(self, keep: Callable[[int], int], budget_tokens: int, rows: int) -> int:
        """Rows a stage keeps: what its budget asks (`asked`), and at least the minimum (`at_least_minimum`)."""
        return self.at_least_minimum(rows, self.asked(keep, budget_tokens, rows))

    def at_least_minimum(self, n: int, keep: int) -> int:
        """What a stage keeps of n rows when its budget asks for `keep`: never fewer than min_keep (the
        fewest its operator can reduce to), and all n when n itself is smaller. A small item in a batch
        is thus kept at the minimum rather than refused (`handle.stats.floored` names those stages)."""
        return keep if keep >= n else max(keep, min(n, self.min_keep))

    def tokens_per_layer(self, n: int) -> list[int]:
        """Visual tokens each decoder layer processes for one item of n budget tokens."""
        counts = [self.count(self.stage1_keep, n, n)] * self.num_layers
        for stage in self.stages:
            kept = self.count(stage.keep, n, counts[stage.layer])
            counts[stage.layer :] = [kept] * (self.num_layers - stage.layer)
        if self.routing is not None:
            for layer in range(self.routing.start_layer, self.num_layers):
                counts[layer] = self.count(lambda b: self.routing.keep(layer, b), n, counts[layer])
        return counts


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
