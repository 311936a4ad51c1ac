"""A ground-truth reference for the accuracy benchmark: keep the patches the scene generator knows
hold objects. Not a method (it reads the answer's labels); it shows how much accuracy any
selection of that many tokens can keep on the small VLM."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.vlm import scenes as S
from tokensieve.methods.base import InnerStage, Schedule
from tokensieve.ops.plan import selection_plan


def object_first_order(sample: S.Sample) -> torch.Tensor:
    """(576,) long: the sample's patches, object centres first, then the other object patches, then
    background; each group in a random order drawn from the sample's seed."""
    owner, anchor = sample.labels[5].reshape(-1), sample.labels[4].reshape(-1)
    group = np.where(anchor == 1, 2, np.where(owner >= 0, 1, 0))
    shuffle = np.random.default_rng(sample.seed).random(group.size)
    return torch.from_numpy(np.lexsort((shuffle, -group)))


@dataclass(frozen=True, eq=False)
class GroundTruthObjects:
    """Before the first decoder layer, keep `budget` patches of each image in `object_first_order`.

    One entry of `orders` per image, in the order the images reach the model: each `compress`
    starts again at the first, and every image the runtime reduces takes the next one.
    """

    budget: int
    orders: tuple[torch.Tensor, ...]

    def schedule(self, num_layers: int, family_defaults: dict) -> Schedule:
        cursor = iter(self.orders)

        def plan(ctx, requests):
            plans = []
            for request in requests:
                order = next(cursor, None)
                if order is None or order.numel() != request.positions.numel():
                    raise ValueError("GroundTruthObjects was given fewer images, or images of another size, than it reduces")
                plans.append(selection_plan(order[:request.keep].sort().values[None]))
            return plans

        stage = InnerStage(0, lambda n: min(n, self.budget), plan, name="ground_truth")
        return Schedule(num_layers, lambda n: n, stages=(stage,))
