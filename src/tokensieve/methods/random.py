"""Random: a seeded uniform subset of each image's visual tokens, the control every method must beat."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.plan import ReductionPlan, selection_plan
from ..runtime.schedule import DecoderStage, Schedule, StageContext, StageRequest
from .base import check_budget, check_type, is_int, kept_tokens


@dataclass(frozen=True)
class Random:
    """Keep a uniformly random subset of each image's projected visual tokens, before the first
    decoder layer.

    No paper of its own: the standard control of token-pruning studies (e.g. "Token Pruning in
    Multimodal Large Language Models: Are We Solving the Right Problem?",
    https://arxiv.org/abs/2502.11501, where it is a strong baseline). Reads nothing, so SDPA and
    FlashAttention stay on and every family is supported.

    Where and how many: an inner stage before decoder layer 0 (on the projected visual tokens, after
    the projector / merger) keeps k = round(b) tokens of an image, so every decoder layer processes k
    and the mean over the layers is k. `budget` (tokens) or `ratio` (fraction of an image's tokens,
    b = ratio * n) is that mean, per image; the literature's "64 tokens" for pre-LLM pruning is the
    same number (64 kept = a mean of 64). On LLaVA-1.5 (576 tokens, 32 layers) budgets 192/128/64
    keep 192/128/64 at every layer. `ratio=1.0` keeps everything. Images (video frames, AnyRes images
    without their newline tokens, which are always kept) are reduced separately.

    The subset of an image of n tokens is the first k of a permutation drawn from a generator seeded
    with (seed, n): it does not depend on the call order, the batch position or the other images, so
    the same input always keeps the same tokens (and images, or frames, of equal size keep the same
    positions). Kept tokens stay in their original order with their original positions.

    Attributes:
        seed: non-negative int mixed with the image's token count to seed the draw.
    """

    budget: float | None = None
    ratio: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.budget is None and self.ratio is None:
            raise ValueError("Random needs a budget (e.g. budget=64) or a ratio (e.g. ratio=0.11)")
        check_budget(self.budget, self.ratio)
        check_type("seed", self.seed, is_int, "a non-negative int seed such as 0")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    def keep(self, n: int) -> int:
        """Tokens kept of an image of n tokens."""
        return kept_tokens(self.budget, self.ratio, n)

    def subset(self, n: int, keep: int) -> torch.Tensor:
        """(keep,) long ascending: the kept indices of an image of n tokens."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
        return torch.randperm(n, generator=generator)[:keep].sort().values

    def schedule(self, num_layers: int, model_type: str = "") -> Schedule:
        def plan(ctx: StageContext, requests: list[StageRequest]) -> list[ReductionPlan]:
            return [selection_plan(self.subset(r.positions.numel(), r.keep)[None]) for r in requests]

        stage = DecoderStage(0, self.keep, plan, name="random", vision_side=True)
        return Schedule(num_layers, lambda n: n, stages=(stage,))
