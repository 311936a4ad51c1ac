"""ALVTS: Adaptive Layer-wise Visual Token Selection (arXiv 2606.14277); docs/methods.md, "ALVTS"."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..ops.alvts import V2V_ROWS
from ..runtime.schedule import BudgetUnreachable, Routing, Schedule
from .base import check_budget, check_type, first_layers, is_int, mean_budget


def layer_counts(n: int, mean: float, num_layers: int, start_layer: int) -> list[int]:
    """Visual tokens each layer processes so that the mean over the layers is `mean` (rounded).

    Layers before start_layer process all n; the rest share round(mean * L) - n * start_layer
    tokens as evenly as possible (earlier layers get the remainder first is avoided: the split is
    floor((i + 1) T / m) - floor(i T / m), which spreads it).

    Raises ValueError when the budget is below what the unrouted layers already spend.
    """
    routed = num_layers - start_layer
    total = round(mean * num_layers) - n * start_layer
    if total < routed:
        raise BudgetUnreachable(too_small_budget(n, mean, num_layers, start_layer))
    counts = [n] * start_layer
    counts += [min(n, (i + 1) * total // routed - i * total // routed) for i in range(routed)]
    return counts


def too_small_budget(n: int, mean: float, num_layers: int, start_layer: int) -> str:
    """Why a mean of `mean` tokens per layer is out of reach: every routed layer processes at least one
    visual token, and the layers before start_layer all n."""
    floor = (n * start_layer + num_layers - start_layer) / num_layers
    if start_layer == 0:
        return (
            f"a mean of {mean:g} visual tokens per layer cannot be met: every layer processes at least one visual "
            f"token, a mean of at least {floor:g}; raise the budget"
        )
    return (
        f"a mean of {mean:g} visual tokens per layer cannot be met when all {n} pass through "
        f"{first_layers(start_layer)} (a mean of at least {floor:.3g}): lower start_layer or raise the budget"
    )


@dataclass(frozen=True)
class ALVTS:
    """Before each decoder layer from `start_layer` on, a calibrated low-rank selector picks the
    visual tokens that layer processes; the others skip it unchanged and rejoin in place, so a
    later layer may pick them again.

    Paper: https://arxiv.org/abs/2606.14277.

    Budget semantics: `budget` (tokens) or `ratio` (fraction of an image's tokens) is the mean
    number of visual tokens per decoder layer per image; layers before `start_layer` process all of
    them and the routed layers share the rest evenly (see `layer_counts`).

    Attributes:
        selectors: a `tokensieve.Selectors`, a path to a saved one, or None for SVD-only selectors
            built on the fly at `rank` (less faithful than calibrated ones: see the README).
        start_layer: first layer with a selector (the paper shows none before the first layer).
        rank: rank of the on-the-fly SVD selectors (default: hidden width / 16, at least 8: the
            paper's R = 256 on a 4096-wide 7B model).
        v2v_rows: what the V2V term's mean over the image's rows divides by: "all" (default) the
            N image rows, "attending" only the rows the causal mask lets attend to the token (the
            token's own and the ones after it); docs/methods.md, "The ALVTS score".
    """

    budget: float | None = None
    ratio: float | None = None
    selectors: object = None
    start_layer: int = 1
    rank: int | None = None
    v2v_rows: str = "all"

    def __post_init__(self) -> None:
        if self.budget is None and self.ratio is None:
            raise ValueError("ALVTS needs a budget (e.g. budget=64) or a ratio (e.g. ratio=0.11)")
        check_budget(self.budget, self.ratio)
        check_type("start_layer", self.start_layer, is_int, "a decoder layer index such as 1")
        check_type("rank", self.rank, is_int, "a selector rank such as 64", optional=True)
        if self.start_layer < 0:
            raise ValueError(f"start_layer must be >= 0, got {self.start_layer}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if self.v2v_rows not in V2V_ROWS:
            raise ValueError(f"v2v_rows must be one of {', '.join(map(repr, V2V_ROWS))}, got {self.v2v_rows!r}")
        if self.selectors is not None and not isinstance(self.selectors, (str, Path)) and not hasattr(self.selectors, "layers"):
            raise ValueError("selectors must be a tokensieve.Selectors, a path to one, or None")

    def resolve_selectors(self, model_type: str, layers: torch.nn.ModuleList):
        """The Selectors to use on this model (checked against it), loading or building them, on the
        model's device and in the precision the scores are computed in (see `layer_scores`)."""
        from ..selectors import Selectors, check_weights_loaded, model_identity, score_dtype, svd_selectors

        check_weights_loaded(layers)
        if self.selectors is None:
            rank = self.rank or max(8, layers[0].self_attn.q_proj.in_features // 16)
            selectors = svd_selectors(model_type, layers, rank, self.start_layer)
        else:
            selectors = Selectors.load(self.selectors) if isinstance(self.selectors, (str, Path)) else self.selectors
            selectors.check_model(model_identity(model_type, layers))
        missing = [i for i in range(self.start_layer, len(layers)) if selectors.layers[i] is None]
        if missing:
            raise ValueError(f"the selectors have no selector for layers {missing}; calibrate from start_layer {self.start_layer}")
        weight = layers[0].self_attn.q_proj.weight
        return selectors.to(weight.device, score_dtype(weight.dtype))

    def schedule(self, num_layers: int, model_type: str = "", selectors=None) -> Schedule:
        if not self.start_layer < num_layers:
            raise ValueError(f"start_layer must be below the {num_layers} decoder layers, got {self.start_layer}")
        from ..flops import selector_flops
        from ..selectors import layer_scores

        def keep(layer: int, n: int) -> int:
            return layer_counts(n, mean_budget(self.budget, self.ratio, n), num_layers, self.start_layer)[layer]

        def score(index, layer, hidden, rotary, item, valid, max_items):
            return layer_scores(layer, hidden, rotary, item, valid, selectors.layers[index], max_items, self.v2v_rows)

        def flops(index: int, widths, rows: int, items: int) -> int:
            query = selectors.layers[index].query
            return selector_flops(widths, rows, query.a.shape[1], items)

        routing = Routing(self.start_layer, keep, score, flops)
        return Schedule(num_layers, vision_keep=lambda n: n, routing=routing)
