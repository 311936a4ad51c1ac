"""PyramidDrop: drop visual tokens in stages, each scored by the attention of the layer it enters."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..attention import last_query_attention, last_query_attention_flops
from ..ops.plan import ReductionPlan
from ..ops.topk import top_scores_plan
from ..runtime.schedule import BudgetUnreachable, DecoderStage, Schedule, StageContext, StageRequest
from .base import check_budget, check_type, is_int, is_real, mean_budget, type_name

STAGES = 3  # drops in the default schedule, as the authors'
EARLIEST = 2  # the default first drop is no earlier than FastV's layer 2


def spaced(first: int, num_layers: int, stages: int) -> tuple[int, ...]:
    """`stages` boundaries from `first`, evenly spaced so each stage lasts about (L - first) / stages
    layers: spaced(8, 32, 3) = (8, 16, 24), the authors' boundaries."""
    return tuple(first + round(s * (num_layers - first) / stages) for s in range(stages))


def stage_lengths(layers: tuple[int, ...], num_layers: int) -> list[int]:
    """Layers each stage lasts: from its boundary to the next one (the last to the end)."""
    return [end - start for start, end in zip(layers, layers[1:] + (num_layers,))]


def authors_mean(layers: tuple[int, ...], num_layers: int, lambda_: float) -> float:
    """Mean visual tokens per layer, as a fraction of n, when stage s (1-based) keeps n * lambda^s."""
    lengths = stage_lengths(layers, num_layers)
    return (layers[0] + sum(length * lambda_ ** (s + 1) for s, length in enumerate(lengths))) / num_layers


def default_boundaries(fraction: float, num_layers: int, lambda_: float) -> tuple[int, ...]:
    """The default drop layers for a mean of `fraction` of the visual tokens per layer.

    Three drops evenly spaced from the first one to the end (see `spaced`); the first drop is the
    latest layer, from EARLIEST (capped so three drops fit) up, at which the authors' ratios
    lambda, lambda^2, lambda^3 spend no more than the budget. A mean of 0.46875 n (270 of 576 on 32
    layers, lambda 0.5) gives the authors' (8, 16, 24); smaller means move the first drop earlier,
    down to (2, 12, 22) on 32 layers, larger ones later. Fewer layers than 4 get fewer drops.
    """
    stages = min(STAGES, num_layers - 1)
    if stages < 1:
        return ()
    lowest = min(EARLIEST, num_layers - stages)
    fitting = [first for first in range(lowest, num_layers - stages + 1)
               if authors_mean(spaced(first, num_layers, stages), num_layers, lambda_) <= fraction + 1e-9]
    return spaced(max(fitting, default=lowest), num_layers, stages)


def stage_counts(n: int, mean: float, layers: tuple[int, ...], num_layers: int, lambda_: float) -> list[int]:
    """Visual tokens each stage keeps of an image of n tokens so the mean over the layers is `mean`.

    Stage s (0-based) keeps n * min(1, rho * lambda^s), the common scale rho solved for the mean
    (rho = lambda reproduces the authors' ratios); counts are rounded, at least 1 and never above the
    previous stage's, and the last stage absorbs the rounding so the realised mean is nearest.

    Raises:
        ValueError when `mean` is below what the layers before the first drop already spend.
    """
    if mean >= n:
        return [n] * len(layers)
    lengths = stage_lengths(layers, num_layers)
    target = mean * num_layers
    if target < layers[0] * n + sum(lengths):
        floor = (layers[0] * n + sum(lengths)) / num_layers
        raise BudgetUnreachable(
            f"PDrop cannot reach a mean of {mean:g} visual tokens per layer on a {n}-token image: its first drop is "
            f"before layer {layers[0]}, so the mean is at least {floor:.1f}; raise the budget or give layers= with an "
            "earlier first drop"
        )
    rho = solve_scale(n, target, layers[0], lengths, lambda_)
    counts: list[int] = []
    for s in range(len(lengths)):
        counts.append(max(1, min(counts[-1] if counts else n, round(n * min(1.0, rho * lambda_**s)))))
    spent = layers[0] * n + sum(length * count for length, count in zip(lengths[:-1], counts[:-1]))
    ceiling = counts[-2] if len(counts) > 1 else n
    counts[-1] = max(1, min(ceiling, round((target - spent) / lengths[-1])))
    return counts


def solve_scale(n: int, target: float, first: int, lengths: list[int], lambda_: float) -> float:
    """rho with first * n + sum_s lengths[s] * n * min(1, rho * lambda^s) = target (bisection; the
    left side grows with rho from first * n to L * n)."""
    def spent(rho: float) -> float:
        return first * n + sum(length * n * min(1.0, rho * lambda_**s) for s, length in enumerate(lengths))

    low, high = 0.0, lambda_ ** -(len(lengths) - 1)
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if spent(middle) < target else (low, middle)
    return (low + high) / 2


def layer_tuple(layers) -> tuple[int, ...]:
    """`layers` as a tuple of ints; TypeError unless it is a sequence of ints (decoder layer indices)."""
    example = "a tuple of decoder layer indices such as (8, 16, 24), or None"
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be {example}, got {layers!r} ({type_name(layers)})")
    layers = tuple(layers)
    wrong = [layer for layer in layers if not is_int(layer)]
    if wrong:
        raise TypeError(f"layers must be {example}; {wrong[0]!r} ({type_name(wrong[0])}) is not an int")
    return tuple(int(layer) for layer in layers)


@dataclass(frozen=True)
class PDrop:
    """PyramidDrop: at a few stage boundaries inside the language model, keep the visual tokens the
    last prompt token attends to most in the layer they enter; fewer survive each boundary.

    Paper: https://arxiv.org/abs/2410.17247 (CVPR 2025).

    Score at the boundary before layer l: layer l's own input layernorm, q/k projections and rotary
    applied to the current hidden states (the input of layer l, after the earlier drops); query = the
    last prefill token; softmax per head in float32, mean over heads, over the image's current
    columns (`tokensieve.attention.last_query_attention`, outside the kernel: SDPA/FlashAttention
    stay on). The top of each image survive, re-sorted into original order (ties to the first
    index). Differences from the authors: original position ids are kept (the authors renumber
    positions after each drop), so the cache and decoding need no renumbering. Prompts must be
    left-padded. With a KV cache the drops happen once, at prefill.

    Budget semantics: `budget` (tokens) or `ratio` (fraction of an image's n tokens) is the mean number
    of visual tokens per decoder layer, per image (the paper's convention too: its "192/128/64" are
    such means). Stage s (1-based) keeps n * rho * lambda_^(s-1), rho solved so the mean over the L
    layers is the budget (see `stage_counts`; the authors' rho = lambda_). Default boundaries
    (`layers=None`, see `default_boundaries`): three drops evenly spaced from the first to the end,
    the first as late as the authors' ratios allow: the authors' [8, 16, 24] with 288/144/72 (a mean
    of 270) on LLaVA-1.5-7B, earlier for smaller means. The first drop depends on the mean as a
    fraction of the image: `ratio` itself, or budget / `reference_tokens` for a budget in tokens (the
    layers cannot depend on each image's size). On LLaVA-1.5-7B (576 tokens, 32 layers, lambda 0.5):
    budget 192 -> drops before layers 2/12/22 keeping 285/143/71 (576 576 then 10 x 285, 10 x 143,
    10 x 71; mean 191.9); 128 -> the same layers keeping 168/84/42 (mean 127.9); 64 -> 51/26/13
    (mean 64.1). `layers=(8, 16, 24)` without a budget is the authors' configuration: stage s keeps
    int(n * lambda_^s). A budget below what the layers before the first drop already spend is a
    ValueError. `ratio=1.0` keeps everything.

    Families: any decoder stack. Not supported on Qwen2.5-VL by its authors; here it runs there too,
    scoring with the layer's M-RoPE cos/sin rows of the current tokens. On Qwen3-VL the first drop
    must come after its deepstack layers (`layers=` from 4 on the released models, which add 3).

    Attributes:
        layers: the drop boundaries (layer l is the first that sees a drop's result), strictly
            increasing in [1, L-1]; None derives them from the budget.
        lambda_: the ratio between consecutive stages (0 < lambda_ < 1).
        reference_tokens: image size the default boundaries are derived for when `budget` is in
            tokens (576: LLaVA-1.5's image).
    """

    budget: float | None = None
    ratio: float | None = None
    layers: tuple[int, ...] | None = None
    lambda_: float = 0.5
    reference_tokens: int = 576

    def __post_init__(self) -> None:
        if self.budget is None and self.ratio is None and self.layers is None:
            raise ValueError("PDrop needs a budget (e.g. budget=64), a ratio (e.g. ratio=0.11) or layers= (e.g. (8, 16, 24))")
        check_budget(self.budget, self.ratio)
        check_type("lambda_", self.lambda_, is_real, "the ratio between consecutive stages such as 0.5")
        check_type("reference_tokens", self.reference_tokens, is_int, "a number of visual tokens such as 576")
        if not 0.0 < self.lambda_ < 1.0:
            raise ValueError(f"lambda_ must be in (0, 1), got {self.lambda_}")
        if self.reference_tokens < 1:
            raise ValueError(f"reference_tokens must be positive, got {self.reference_tokens}")
        if self.layers is not None:
            layers = layer_tuple(self.layers)
            if not layers or layers[0] < 1 or any(a >= b for a, b in zip(layers, layers[1:])):
                raise ValueError(f"layers must be strictly increasing ints >= 1, e.g. (8, 16, 24); got {self.layers!r}")
            object.__setattr__(self, "layers", layers)

    def boundaries(self, num_layers: int) -> tuple[int, ...]:
        """The layers before which the drops happen on an L-layer model."""
        if self.layers is not None:
            if self.layers[-1] >= num_layers:
                raise ValueError(f"layers must be below {num_layers} for a {num_layers}-layer model, got {self.layers}")
            return self.layers
        fraction = self.ratio if self.ratio is not None else self.budget / self.reference_tokens
        return default_boundaries(fraction, num_layers, self.lambda_)

    def counts(self, n: int, num_layers: int) -> list[int]:
        """Visual tokens each stage keeps of an image of n tokens."""
        layers = self.boundaries(num_layers)
        if self.budget is None and self.ratio is None:
            return [max(1, int(n * self.lambda_ ** (s + 1))) for s in range(len(layers))]
        return stage_counts(n, mean_budget(self.budget, self.ratio, n), layers, num_layers, self.lambda_)

    def schedule(self, num_layers: int, model_type: str = "") -> Schedule:
        layers = self.boundaries(num_layers)
        if not layers:
            if self.ratio == 1.0:
                return Schedule(num_layers, lambda n: n)
            raise ValueError(f"PDrop needs at least 2 decoder layers to drop tokens; this model has {num_layers}")
        if self.ratio is not None and self.ratio < 1 and self.ratio * num_layers <= layers[0]:
            raise ValueError(
                f"PDrop cannot reach ratio={self.ratio:g} on a {num_layers}-layer model with its first drop before layer "
                f"{layers[0]}: raise the ratio or give layers= with an earlier first drop"
            )
        counts = lru_cache(maxsize=64)(lambda n: tuple(self.counts(n, num_layers)))

        def plan(ctx: StageContext, requests: list[StageRequest]) -> list[ReductionPlan]:
            scores = last_query_attention(ctx.layers[ctx.layer], ctx.hidden, ctx.rotary, ctx.valid)  # (B, S)
            return [top_scores_plan(scores[r.row, r.positions][None], r.keep) for r in requests]

        stages = tuple(
            DecoderStage(layer, lambda n, s=s: counts(n)[s], plan, name=f"drop{s + 1}", reads_last_token=True,
                       flops=last_query_attention_flops)
            for s, layer in enumerate(layers)
        )
        return Schedule(num_layers, lambda n: n, stages=stages)
