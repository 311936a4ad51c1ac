"""DivPrune: keep the most diverse visual tokens (greedy max-min cosine distance), before the LLM."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.divprune import divprune_flops, divprune_select
from ..ops.plan import ReductionPlan, selection_plan
from ..runtime.schedule import DecoderStage, Schedule, StageContext, StageRequest
from .base import check_budget, grouped_plans, kept_tokens


@dataclass(frozen=True)
class DivPrune:
    """Keep the subset of each image's projected visual tokens whose closest pair is farthest apart
    (a greedy solution of the max-min diversity problem), before the first decoder layer.

    Paper: https://arxiv.org/abs/2503.02175 (CVPR 2025). Attention-free and text-free: SDPA and
    FlashAttention stay on, every family is supported (on Qwen-VL it runs on the merger's output).

    Selection (`tokensieve.ops.divprune.divprune_select` on the (n, D) projected tokens of one image):
    distances 1 - cosine in float32 (the authors use fp16); the first pick is the token whose nearest
    other token is farthest, then repeatedly the token farthest from the picked set; ties go to the
    first index. The authors read the nearest neighbour as the second-smallest entry of a column
    (the smallest being the token itself); here the diagonal is excluded explicitly, which is the
    same unless rounding makes a self-distance exceed a duplicate's. Kept tokens stay in original
    order with their original positions.

    Where and how many: an inner stage before decoder layer 0 keeps k = round(b) tokens of an image,
    so every decoder layer processes k and the mean over the layers is k. `budget` (tokens) or
    `ratio` (fraction of an image's n tokens) is that mean, per image; the authors' "64 tokens" is
    the same number. On LLaVA-1.5 (576 tokens, 32 layers) budgets 192/128/64 keep 192/128/64 at every
    layer. `ratio=1.0` keeps everything. Video frames and AnyRes images (without their newline
    tokens, always kept) are reduced separately.
    """

    budget: float | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.budget is None and self.ratio is None:
            raise ValueError("DivPrune needs a budget (e.g. budget=64) or a ratio (e.g. ratio=0.11)")
        check_budget(self.budget, self.ratio)

    def keep(self, n: int) -> int:
        """Tokens kept of an image of n tokens."""
        return kept_tokens(self.budget, self.ratio, n)

    def schedule(self, num_layers: int, model_type: str = "") -> Schedule:
        def select(x: torch.Tensor, keep: int) -> ReductionPlan:
            return selection_plan(divprune_select(x, keep))

        def plan(ctx: StageContext, requests: list[StageRequest]) -> list[ReductionPlan]:
            return grouped_plans(requests, lambda r: ctx.hidden[r.row, r.positions], select)

        stage = DecoderStage(0, self.keep, plan, name="divprune", vision_side=True, flops=divprune_flops)
        return Schedule(num_layers, lambda n: n, stages=(stage,))
