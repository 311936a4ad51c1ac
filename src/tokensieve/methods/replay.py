"""Replay: feed the model exactly the tokens another method kept, with no scoring ("oracle" timing).

Running the same runtime with `Replay` instead of the method it replays measures the prefill of
the same model on the same kept tokens, with the method's scoring cost removed; the ratio of the
two prefill times is the method's overhead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.plan import ReductionPlan, selection_plan
from ..runtime.schedule import DecoderStage, Schedule, StageContext, StageRequest


@dataclass(frozen=True, eq=False)
class Replay:
    """A method whose plans are plain selections of recorded kept indices.

    Meant for timing single forwards of the input the indices were recorded on (no merging, no
    scoring: the kept rows are copied as they are, so outputs differ from a merging method's; the
    tokens each layer processes are the same). Build it with `Replay.from_handle(handle)` right
    after the forward of the method to replay.

    How the indices reach the runtime: the replay reuses the recorded method's keep counts and
    stage-2 layer, so the runtime asks for the same plans in the same order. Each call
    `plan(x (G, N, D), keep, stage)` takes the next G recorded items of that stage whose input size
    is N and whose kept count is `keep`, in sequence order (a queue per (stage, N, keep)). A queue
    starts over once it has been consumed, so repeated forwards of the same input replay the same
    selection each time; a forward that raised half-way can leave a queue with several items out of
    step (build a new Replay then).

    Attributes:
        kept: one dict per visual item in sequence order, as `handle.stats.kept`: stage name ->
            (k,) long indices of the item's tokens kept after that stage.
        sizes: tokens of each item before stage 1 (its placeholder count).
        source: the replayed method's schedule on this model (`handle.schedule`).
        recorded: the plans' kept indices as the method's prefill asked for them (`handle.stats.plans`),
            or None to derive them from `kept`. Given by `from_handle`, they also cover what `kept`
            cannot say alone: plans per crop of a LLaVA-NeXT image, around its pinned newlines.
    """

    kept: tuple[dict[str, torch.Tensor], ...]
    sizes: tuple[int, ...]
    source: Schedule
    recorded: tuple[tuple[tuple[str, int, int], torch.Tensor], ...] | None = None

    def __post_init__(self) -> None:
        if len(self.kept) != len(self.sizes):
            raise ValueError(f"{len(self.kept)} kept records but {len(self.sizes)} item sizes; give one size per item")
        for i, (record, n) in enumerate(zip(self.kept, self.sizes)):
            if "stage1" not in record:
                raise ValueError(f"item {i}: kept needs a 'stage1' entry, got {sorted(record)}")
            stage1 = record["stage1"]
            if stage1.numel() and int(stage1.max()) >= n:
                raise ValueError(f"item {i}: stage-1 index {int(stage1.max())} is out of range for {n} tokens")
            for name, index in record.items():
                if name != "stage1" and not bool(torch.isin(index, stage1).all()):
                    raise ValueError(f"item {i}: {name} kept tokens that stage 1 dropped")

    @classmethod
    def from_handle(cls, handle) -> "Replay":
        """The replay of the last prefill a `compress` handle ran (one forward)."""
        stats = handle.stats
        if stats is None:
            raise ValueError("the handle has no stats yet: run a forward pass under it first")
        sizes = tuple(item.keep.numel() for item in stats.items)
        kept = tuple({stage: index.clone() for stage, index in record.items()} for record in stats.kept)
        recorded = tuple((key, index.detach().cpu().clone()) for key, index in stats.plans)
        return cls(kept=kept, sizes=sizes, source=handle.schedule, recorded=recorded)

    def schedule(self, num_layers: int, model_type: str = "") -> Schedule:
        if num_layers != self.source.num_layers:
            raise ValueError(
                f"the replayed schedule was made for {self.source.num_layers} decoder layers, this model has {num_layers}"
            )
        plans = _ReplayPlans(self._queues())
        stages = tuple(
            DecoderStage(stage.layer, stage.keep, plans.stage_plan(stage.name), name=stage.name)
            for stage in self.source.stages
        )
        return Schedule(num_layers, self.source.vision_keep, plans, stages=stages)

    def _queues(self) -> dict[tuple[str, int, int], list[torch.Tensor]]:
        """(stage, input size N, kept count) -> the (keep,) plan indices of each reduced item, in order.

        Each inner stage sees the survivors of the stage before it, in order: its indices are
        positions among them.
        """
        queues: dict[tuple[str, int, int], list[torch.Tensor]] = {}
        if self.recorded is not None:
            for key, index in self.recorded:
                queues.setdefault(key, []).append(index)
            return queues
        names = ["stage1"] + [stage.name for stage in self.source.stages]
        for record, n in zip(self.kept, self.sizes):
            previous = torch.arange(n)
            for name in names:
                if name not in record:
                    continue
                kept = record[name].sort().values
                if kept.numel() < previous.numel():
                    index = torch.searchsorted(previous, kept)
                    queues.setdefault((name, previous.numel(), kept.numel()), []).append(index)
                previous = kept
        return queues


class _ReplayPlans:
    """The plan function of a replay: pops recorded indices from per-(stage, N, keep) queues."""

    def __init__(self, queues: dict[tuple[str, int, int], list[torch.Tensor]]) -> None:
        self.queues = queues
        self.cursor = {key: 0 for key in queues}

    def stage_plan(self, name: str):
        """The plan function of the inner stage `name`: the next recorded selection per request."""
        def plan(ctx: StageContext, requests: list[StageRequest]) -> list[ReductionPlan]:
            return [self._next(name, r.positions.numel(), r.keep, 1).row(0) for r in requests]
        return plan

    def __call__(self, x: torch.Tensor, keep: int, evidence=None) -> ReductionPlan:
        """The vision side's plan: the next recorded "stage1" selections of x (G, n, D)."""
        return self._next("stage1", x.shape[1], keep, x.shape[0]).to(x.device)

    def _next(self, stage: str, n: int, keep: int, count: int) -> ReductionPlan:
        """Selection plan of the next `count` recorded items: kept_index (count, keep)."""
        key = (stage, n, keep)
        queue = self.queues.get(key)
        if not queue:
            raise RuntimeError(
                f"Replay has no recorded {stage} selection of {keep} out of {n} tokens; "
                "replay only the input the indices were recorded on"
            )
        rows = [queue[(self.cursor[key] + g) % len(queue)] for g in range(count)]
        self.cursor[key] = (self.cursor[key] + count) % len(queue)
        return selection_plan(torch.stack(rows))
