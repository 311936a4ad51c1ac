"""ApET: Approximation-Error guided Token compression (arXiv 2602.19870); docs/methods.md, "ApET"."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flops import apet_flops
from ..ops.apet import apet_plan
from ..ops.plan import ReductionPlan
from ..runtime.schedule import DecoderStage, Schedule, StageContext, StageRequest
from .base import (
    check_budget, check_stage_layer, check_type, grouped_plans, is_bool, is_int, is_real, mean_budget, tokens_after,
)


# The weight of the basis features in the basis slots, per model_type, as the paper's reference code
# uses them: LLaVA's keep the basis features as they are (1.0, the default); Qwen-VL's blend basis and
# their own features equally.
BASIS_BLEND = {"qwen2_vl": 0.5, "qwen2_5_vl": 0.5, "qwen3_vl": 0.5}


@dataclass(frozen=True)
class ApET:
    """Keep the visual tokens a few basis tokens reconstruct worst; merge the others into them.

    Paper: https://arxiv.org/abs/2602.19870. Attention-free: SDPA and FlashAttention stay on.

    Budget semantics: `budget` (tokens) or `ratio` (fraction of an item's visual tokens) is the
    mean number of visual tokens per decoder layer, per image. By default stage 1 (vision side,
    before the language model) keeps round(1.5 * b) and stage 2 (on the hidden states entering
    decoder layer `layer`, 0-based, default L // 2: the paper's "after layer 16" of 32) keeps what makes the mean over the L layers equal b:
    0.5 * b when layer = L / 2 (64 -> 96 then 32; 128 -> 192 then 64; 192 -> 288 then 96).
    If 1.5 * b exceeds the image's N tokens, stage 1 keeps N and stage 2 the rest of the budget;
    `ratio=1.0` keeps everything. `stage1`/`stage2` (tokens per image) set the stages directly
    instead of a budget (`stage2=None` then means no stage 2). Images with fewer tokens than a
    stage's count keep all of them. Original positions are kept (gaps stay).

    Attributes:
        num_basis: basis tokens found by farthest point sampling (k).
        eps: ridge regulariser of the reconstruction.
        basis_blend: weight of the basis features in the basis slots; None takes the reference
            value for the model (`BASIS_BLEND`: 0.5 for Qwen-VL, 1.0 otherwise).
        merge: average every dropped token into its cosine-nearest kept token.
        seed: int: the first FPS pick is the index drawn from a generator seeded with it (the
            reference draws it at random); None: the token farthest from the token mean.
    """

    budget: float | None = None
    ratio: float | None = None
    stage1: int | None = None
    stage2: int | None = None
    layer: int | None = None
    num_basis: int = 10
    eps: float = 1e-5
    basis_blend: float | None = None
    merge: bool = True
    seed: int | None = 0

    def __post_init__(self) -> None:
        self._check_types()
        explicit = self.stage1 is not None or self.stage2 is not None
        if explicit and (self.budget is not None or self.ratio is not None):
            raise ValueError("give a budget/ratio or explicit stage1/stage2 token counts, not both")
        if not explicit and self.budget is None and self.ratio is None:
            raise ValueError("ApET needs a budget (e.g. budget=64), a ratio (e.g. ratio=0.25) or stage1/stage2 counts")
        check_budget(self.budget, self.ratio)
        if self.stage2 is not None and self.stage1 is None:
            raise ValueError("stage2 needs stage1 as well (stage 1 keeps at least as many tokens)")
        for name in ("stage1", "stage2"):
            value = getattr(self, name)
            if value is not None and value < self.num_basis + 1:
                raise ValueError(f"{name}={value} must be at least num_basis + 1 = {self.num_basis + 1}")
        if self.stage2 is not None and self.stage2 > self.stage1:
            raise ValueError(f"stage2={self.stage2} cannot keep more than stage1={self.stage1}")
        if self.num_basis < 1:
            raise ValueError(f"num_basis must be at least 1, got {self.num_basis}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.basis_blend is not None and not 0.0 <= self.basis_blend <= 1.0:
            raise ValueError(f"basis_blend must be in [0, 1], got {self.basis_blend}")

    def _check_types(self) -> None:
        """TypeError for a field of the wrong type (a string, a bool where a number belongs, ...)."""
        check_type("stage1", self.stage1, is_int, "a number of visual tokens such as 96", optional=True)
        check_type("stage2", self.stage2, is_int, "a number of visual tokens such as 32", optional=True)
        check_type("layer", self.layer, is_int, "a decoder layer index such as 16", optional=True)
        check_type("num_basis", self.num_basis, is_int, "a number of basis tokens such as 10")
        check_type("eps", self.eps, is_real, "a small positive number such as 1e-5")
        check_type("basis_blend", self.basis_blend, is_real, "a weight in [0, 1] such as 0.5", optional=True)
        check_type("merge", self.merge, is_bool, "True or False")
        check_type("seed", self.seed, is_int, "an int seed such as 0", optional=True)

    def stage2_layer(self, num_layers: int) -> int:
        layer = num_layers // 2 if self.layer is None else self.layer
        check_stage_layer(layer, num_layers)
        return layer

    def schedule(self, num_layers: int, model_type: str = "") -> Schedule:
        layer = self.stage2_layer(num_layers)
        blend = self.basis_blend if self.basis_blend is not None else BASIS_BLEND.get(model_type, 1.0)

        def stage1_keep(n: int) -> int:
            if self.stage1 is not None:
                return min(n, self.stage1)
            return min(n, round(1.5 * mean_budget(self.budget, self.ratio, n)))

        def stage2_keep(n: int) -> int:
            first = stage1_keep(n)
            if self.stage1 is not None:
                return first if self.stage2 is None else min(first, self.stage2)
            wanted = tokens_after(mean_budget(self.budget, self.ratio, n), first, layer, num_layers)
            return max(0, min(first, round(wanted)))

        def plan(x: torch.Tensor, keep: int, evidence=None) -> ReductionPlan:
            return apet_plan(x, keep, self.num_basis, self.eps, blend, self.merge, start=self._start(x))

        def stage2_plan(ctx: StageContext, requests: list[StageRequest]) -> list[ReductionPlan]:
            return grouped_plans(requests, lambda r: ctx.hidden[r.row, r.positions], plan)

        flops = lambda n, keep, width: apet_flops(n, keep, self.num_basis, width)  # noqa: E731
        stage2 = DecoderStage(layer, stage2_keep, stage2_plan, name="stage2", flops=flops)
        return Schedule(num_layers, stage1_keep, plan, stages=(stage2,), min_keep=self.num_basis + 1, vision_plan_flops=flops)

    def _start(self, x: torch.Tensor) -> int | None:
        if self.seed is None:
            return None
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randint(x.shape[1], (1,), generator=generator).tolist()[0]  # a host generator: no device read
