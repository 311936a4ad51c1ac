"""Ground-truth references for the accuracy benchmark: keep the patches the scene generator knows
hold objects. Not methods (they read the answer's labels); they show how much accuracy a selection
that knows where every object is keeps on the small VLM, in a method's schedule shape."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from . import scenes as S
from ..methods.alvts import layer_counts
from ..runtime.schedule import DecoderStage, Routing, Schedule
from ..ops.plan import selection_plan


def object_first_order(sample: S.Sample) -> torch.Tensor:
    """(576,) long: the sample's patches, object centres first, then the other object patches, then
    background; each group in a random order drawn from the sample's seed."""
    owner, anchor = sample.labels[5].reshape(-1), sample.labels[4].reshape(-1)
    group = np.where(anchor == 1, 2, np.where(owner >= 0, 1, 0))
    shuffle = np.random.default_rng(sample.seed).random(group.size)
    return torch.from_numpy(np.lexsort((shuffle, -group)))


def ranks(order: torch.Tensor) -> torch.Tensor:
    """(n,) long: each patch's place in `order` (the inverse permutation)."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank


@dataclass(frozen=True, eq=False)
class GroundTruthObjects:
    """Keep each image's first patches in `object_first_order`, a mean of `budget` per decoder layer.

    One stage (default): `budget` patches before the first decoder layer. `two_stage`: ApET's
    schedule shape, round(1.5 * budget) before the first layer, then after layer L // 2 the first of
    those in the same order, as many as make the mean over the L layers `budget`.

    One entry of `orders` per image, in the order the images reach the model: each `compress`
    starts again at the first, and every image the runtime reduces takes the next one.
    """

    budget: int
    orders: tuple[torch.Tensor, ...]
    two_stage: bool = False

    def schedule(self, num_layers: int, model_type: str = "") -> Schedule:
        cursor, kept_first = iter(self.orders), deque()
        layer = num_layers // 2

        def first_keep(n: int) -> int:
            return min(n, round(1.5 * self.budget) if self.two_stage else self.budget)

        def second_keep(n: int) -> int:
            first = first_keep(n)
            return max(0, min(first, round((self.budget * num_layers - first * layer) / (num_layers - layer))))

        def plan_first(ctx, requests):
            plans = []
            for request in requests:
                order = next(cursor, None)
                if order is None or order.numel() != request.positions.numel():
                    raise ValueError("GroundTruthObjects was given fewer images, or images of another size, than it reduces")
                kept = order[:request.keep].sort().values
                kept_first.append((order, kept))
                plans.append(selection_plan(kept[None]))
            return plans

        def plan_second(ctx, requests):
            plans = []
            for request in requests:
                order, kept = kept_first.popleft()
                plans.append(selection_plan(ranks(order)[kept].argsort()[:request.keep].sort().values[None]))
            return plans

        stages = [DecoderStage(0, first_keep, plan_first, name="ground_truth")]
        if self.two_stage:
            stages.append(DecoderStage(layer, second_keep, plan_second, name="ground_truth_stage2"))
        return Schedule(num_layers, lambda n: n, stages=tuple(stages))


@dataclass(frozen=True, eq=False)
class GroundTruthRouted:
    """ALVTS's routing with a perfect score: the same layers process the same number of visual tokens
    as `ALVTS(budget, start_layer=start_layer)`, but every routed layer takes each image's first
    patches in `object_first_order` instead of the V2V x T2V top-k. The others skip the layer, as in
    ALVTS. It separates what ALVTS's schedule shape costs from what its scores cost.

    `orders` as in GroundTruthObjects: one per image, in the order the images reach the model (batch
    rows in order); each forward takes the next ones at its first routed layer.
    """

    budget: int
    orders: tuple[torch.Tensor, ...]
    start_layer: int = 1

    def schedule(self, num_layers: int, model_type: str = "") -> Schedule:
        cursor, current = iter(self.orders), []

        def keep(layer: int, n: int) -> int:
            return layer_counts(n, min(self.budget, n), num_layers, self.start_layer)[layer]

        def score(index, layer, hidden, rotary, item, valid, max_items):
            """(B, S) float32: n - rank in the image's order on its visual rows, 0 on text rows."""
            images = [g for g in item.unique().tolist() if g >= 0]  # items are numbered across the batch
            if index == self.start_layer:
                current[:] = [next(cursor, None) for _ in images]
            scores = torch.zeros(item.shape, dtype=torch.float32, device=item.device)
            for g, order in zip(images, current):
                at = item == g
                if order is None or order.numel() != int(at.sum()):
                    raise ValueError("GroundTruthRouted was given fewer images, or images of another size, than it routes")
                scores[at] = (order.numel() - ranks(order)).float().to(item.device)
            return scores

        return Schedule(num_layers, lambda n: n, routing=Routing(self.start_layer, keep, score))
