"""What a model family may ask of the runtime while its vision side runs: how many tokens an item
keeps, plans for its items, and a record of each item. Families get this port, never the session."""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch

from ..ops.plan import ReductionPlan
from .hooks import HookSet
from .schedule import Schedule, VisionEvidence, groups_of_equal_size
from .state import VisualItem


class VisionAttention(Protocol):
    """A family's reading of the vision layer behind its features (`Family.vision_attention`)."""

    def install(self, hooks: HookSet) -> None:
        """Place the hooks that read the layer in every vision forward."""

    def evidence(self, sources: torch.Tensor) -> VisionEvidence:
        """What the last reading says of its rows `sources` (G, n) long."""


class FamilyPort:
    """The vision-side reduction of the last encoding of each modality, and its record.

    Attributes:
        schedule: the method's schedule (read-only for families).
        items: per modality, the VisualItems of the last encoding, in encoding order.
        flops: per modality, the selection FLOPs the last encoding's plans cost.
        plans: per modality, the kept indices of its plans, ((stage, n, keep), (keep,)) in call order.
        tokens_behind: cache -> the uncompressed tokens a compressed cache stands for, or None when the
            cache is not this handle's (for families that derive decoding positions).
        attention: the family's reading of its vision layer, when the schedule reads vision attention.
    """

    def __init__(self, schedule: Schedule, tokens_behind: Callable[[Any], int | None]) -> None:
        self.schedule = schedule
        self.tokens_behind = tokens_behind
        self.attention: VisionAttention | None = None
        self.items: dict[str, list[VisualItem]] = {}
        self.flops: dict[str, int] = {}
        self.plans: dict[str, list] = {}

    @property
    def min_keep(self) -> int:
        """Fewest tokens the method reduces a part of an item to."""
        return self.schedule.min_keep

    def keep(self, budget_tokens: int) -> int:
        """What the vision side keeps of an item (or frame) of this many tokens, the method's minimum at least."""
        return self.schedule.count(self.schedule.vision_keep, budget_tokens, budget_tokens)

    def begin_items(self, modality: str) -> None:
        """A new encoding of this modality starts: forget the items of the previous one."""
        self.items[modality], self.flops[modality], self.plans[modality] = [], 0, []

    @property
    def reads_vision_attention(self) -> bool:
        """Whether `plan_items` needs `sources`: where each feature came from in the vision layer."""
        return self.attention is not None

    def plan_items(
        self, features: Sequence[torch.Tensor], keeps: Sequence[int], modality: str = "image",
        sources: Sequence[torch.Tensor] | None = None,
    ) -> list[ReductionPlan | None]:
        """Vision-side plans for items of (n_i, D) features keeping keeps[i] each (None: keep all).

        Items of equal (n, keep) are reduced together as one batch. sources: per item, (n_i,) long,
        the row of the family's vision-layer reading each feature came from (needed when
        `reads_vision_attention`).
        """
        plans: list[ReductionPlan | None] = [None] * len(features)
        reduced = [i for i, (x, keep) in enumerate(zip(features, keeps)) if keep < x.shape[0]]
        for (n, keep), members in groups_of_equal_size(reduced, lambda i: (features[i].shape[0], keeps[i])).items():
            self.flops[modality] = self.flops.get(modality, 0) + self._plan_flops(n, keep, features[members[0]].shape[-1],
                                                                                  len(members))
            evidence = None if self.attention is None else self._evidence(sources, members)
            plan = self.schedule.vision_plan(torch.stack([features[i] for i in members]), keep, evidence)
            self.plans.setdefault(modality, []).extend((("stage1", n, keep), row) for row in plan.kept_index)
            for j, i in enumerate(members):
                plans[i] = plan.row(j)
        return plans

    def add_item(self, item: VisualItem) -> None:
        """Record an item of the current encoding (in the order the model hands them to the language model)."""
        for _, _, budget in item.spans():
            self.schedule.count_noting_floor(self.schedule.vision_keep, budget, budget, item.floored, "stage1")
        self.items.setdefault(item.modality, []).append(item)

    def _evidence(self, sources: Sequence[torch.Tensor] | None, members: list[int]) -> VisionEvidence:
        if sources is None:
            raise RuntimeError("this method reads the vision attention, and the family did not say where its features came from")
        return self.attention.evidence(torch.stack([sources[i] for i in members]))

    def _plan_flops(self, n: int, keep: int, width: int, count: int) -> int:
        """FLOPs of `count` plans reducing n tokens of this width to keep (0 if the method says nothing)."""
        if self.schedule.vision_plan_flops is None:
            return 0
        return count * self.schedule.vision_plan_flops(n, keep, width)

