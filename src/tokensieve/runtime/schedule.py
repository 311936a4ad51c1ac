"""The form every method compiles to for one model: where it reduces visual tokens (on the vision
side, before decoder layer K, or per layer by routing), how many each reduction keeps, and how.

Methods build a `Schedule`; the runtime runs it and knows nothing of the method behind it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from ..ops.plan import ReductionPlan



@dataclass(frozen=True)
class VisionEvidence:
    """What the vision encoder layer behind the vision-side features says of each of them (for a
    method whose schedule `reads_vision_attention`; the family reads the layer, see
    `tokensieve.models.vision_attention`).

    Attributes:
        score: (G, n) float32: the attention the layer pays each feature's rows (the CLS row's
            attention where the encoder has a CLS token, else the attention each row receives).
        keys: (G, n, d) float32: the layer's keys of each feature, mean over heads.
    """

    score: torch.Tensor
    keys: torch.Tensor


# (x (G, n, D), keep, evidence of x's rows or None) -> one plan of G rows keeping `keep` each
PlanFn = Callable[[torch.Tensor, int, VisionEvidence | None], ReductionPlan]


class BudgetUnreachable(ValueError):
    """A method's budget cannot be met on an item of this size: the layers before its first reduction
    already spend more than the mean allows. `compress` raises it for the model's nominal item; inside
    a batch, a smaller item keeps the method's minimum instead (`Schedule.count`)."""


@dataclass(frozen=True)
class Routing:
    """Per-layer selection: before each layer from start_layer on, the layer processes its own
    choice of visual tokens; the others skip it unchanged.

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
class DecoderStage:
    """A permanent reduction of the visual rows before decoder layer `layer`.

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


@dataclass(frozen=True)
class Schedule:
    """A method resolved for one model: where it reduces and how many tokens each reduction keeps.

    Attributes:
        num_layers: decoder layers L.
        vision_keep: n -> tokens the vision side keeps of an item whose budget counts n (n: untouched).
            Its kept indices are recorded under "stage1" in `handle.stats.kept`.
        vision_plan: (x (G, N, D), keep, evidence) -> ReductionPlan for the vision side, or None;
            evidence is a VisionEvidence of x's rows when `reads_vision_attention`, else None.
        stages: reductions before decoder layers, in layer order.
        min_keep: fewest tokens a reduction keeps of an item it reduces (its operator's minimum).
        routing: per-layer selection, or None.
        vision_plan_flops: (n, keep, width) -> FLOPs of one item's vision-side plan, or None.
        reads_vision_attention: the vision plan needs what the vision layer behind the features
            says of them; `compress` refuses a family that cannot read that layer.
    """

    num_layers: int
    vision_keep: Callable[[int], int]
    vision_plan: PlanFn | None = None
    stages: tuple[DecoderStage, ...] = ()
    min_keep: int = 1
    routing: Routing | None = None
    vision_plan_flops: Callable[[int, int, int], int] | None = None
    reads_vision_attention: bool = False

    def stage_at(self, layer: int) -> DecoderStage | None:
        return next((stage for stage in self.stages if stage.layer == layer), None)

    def check_item(self, n: int) -> None:
        """ValueError if a stage would have to keep fewer than min_keep of an item's n tokens."""
        checks = [("the vision side", self.vision_keep(n))] + [(stage.name, stage.keep(n)) for stage in self.stages]
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

    def count_noting_floor(self, keep: Callable[[int], int], budget_tokens: int, rows: int, floored: set[str],
                           name: str) -> int:
        """`count`, adding `name` to `floored` (an item's record) when the minimum raised it above the budget's."""
        asked = self.asked(keep, budget_tokens, rows)
        kept = self.at_least_minimum(rows, asked)
        if kept > asked:
            floored.add(name)
        return kept

    def at_least_minimum(self, n: int, keep: int) -> int:
        """What a stage keeps of n rows when its budget asks for `keep`: never fewer than min_keep (the
        fewest its operator can reduce to), and all n when n itself is smaller. A small item in a batch
        is thus kept at the minimum rather than refused (`handle.stats.floored` names those stages)."""
        return keep if keep >= n else max(keep, min(n, self.min_keep))

    def tokens_per_layer(self, n: int) -> list[int]:
        """Visual tokens each decoder layer processes for one item of n budget tokens."""
        counts = [self.count(self.vision_keep, n, n)] * self.num_layers
        for stage in self.stages:
            kept = self.count(stage.keep, n, counts[stage.layer])
            counts[stage.layer :] = [kept] * (self.num_layers - stage.layer)
        if self.routing is not None:
            for layer in range(self.routing.start_layer, self.num_layers):
                counts[layer] = self.count(lambda b: self.routing.keep(layer, b), n, counts[layer])
        return counts


def groups_of_equal_size(indices, size: Callable[[int], tuple]) -> dict[tuple, list[int]]:
    """indices grouped by size(i), in first-seen order: items of one size are planned as one batch."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault(size(i), []).append(i)
    return groups


@runtime_checkable
class Method(Protocol):
    """What `compress` accepts: hyper-parameters that compile to a Schedule for one model."""

    def schedule(self, num_layers: int, model_type: str = "", **context: Any) -> Schedule:
        """The schedule on a model of `num_layers` decoder layers and this `model_type`."""


@runtime_checkable
class NeedsSelectors(Protocol):
    """A method whose schedule needs per-layer selectors resolved against the model first (calibrated ones, for example)."""

    def resolve_selectors(self, model_type: str, layers: torch.nn.ModuleList) -> Any:
        """Selectors checked against (or built from) these decoder layers; passed to `schedule`."""
