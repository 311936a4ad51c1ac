"""FastV: after layer K-1, keep the visual tokens the last prompt token attends to most."""
from __future__ import annotations

from dataclasses import dataclass

from ..attention import last_query_attention, last_query_attention_flops
from ..ops.plan import ReductionPlan
from ..ops.topk import top_scores_plan
from ..runtime.schedule import BudgetUnreachable, DecoderStage, Schedule, StageContext, StageRequest
from .base import (
    check_budget, check_ratio_reachable, check_stage_layer, check_type, first_layers, is_int, mean_budget,
    tokens_after,
)


@dataclass(frozen=True)
class FastV:
    """Layers 0..K-1 see every token; before layer K the visual tokens receiving the least attention
    from the last prompt token at layer K-1 are dropped for the rest of the prefill.

    Paper: https://arxiv.org/abs/2403.06764 (ECCV 2024), "An Image is Worth 1/2 Tokens After Layer 2".

    Score: layer K-1's attention probabilities (its own input layernorm, q/k projections and rotary
    on its input hidden states; softmax per head, mean over heads), row of the last prefill token,
    columns of the image. The row is computed outside the attention kernel
    (`tokensieve.attention.last_query_attention`), once per forward for the whole batch, so the
    model keeps SDPA or FlashAttention: nothing is switched to eager. Keep the top R of each image
    (ties to the first index), in original order with original position ids (gaps remain, as in the
    authors' code). With a KV cache it prunes once, at prefill; decoding reuses that cut. Prompts
    must be left-padded (the last position is read as the last prompt token).

    Budget semantics: `budget` (tokens) or `ratio` (fraction of an image's n tokens) is the mean
    number of visual tokens per decoder layer, per image, b. With L layers the first K process n and
    the other L - K process R = round((b * L - K * n) / (L - K)), the count whose mean is nearest b.
    The paper's convention is R itself: give it as `kept=` (FastV "64" = `kept=64` = 64 kept after
    layer 2 = a mean of (2 * 576 + 30 * 64) / 32 = 96 on LLaVA-1.5-7B). On LLaVA-1.5-7B (576 tokens,
    32 layers, K = 2) budgets 192/128/64 keep R = 166/98/30 after layer 2 (means 191.6/127.9/64.1;
    the paper's R = 192/128/64 are means of 216/156/96). A budget below what the first K layers
    already spend, (K * n + L - K) / L (37 for 576 tokens on 32 layers with K = 2), is a ValueError:
    raise it, lower `layer`, or give `kept=`. `ratio=1.0` keeps everything.

    Families: any decoder stack (LLaVA-1.5, LLaVA-NeXT with its image newlines always kept, Qwen2/
    2.5/3-VL with the M-RoPE cos/sin rows of the kept tokens, as LightCompress does). On Qwen3-VL the cut must come after its deepstack layers (`layer=4` or later on
    the released models, which add 3); the default is refused there with that fix.

    Attributes:
        layer: K, the first decoder layer that sees the cut sequence (1 <= K < L); the score is
            layer K-1's attention.
        kept: R, tokens kept per image after the cut (the paper's convention), instead of a budget.
    """

    budget: float | None = None
    ratio: float | None = None
    layer: int = 2
    kept: int | None = None

    def __post_init__(self) -> None:
        if sum(value is not None for value in (self.budget, self.ratio, self.kept)) != 1:
            raise ValueError(
                "FastV needs exactly one of budget= (mean visual tokens per layer, e.g. 64), ratio= "
                "(e.g. 0.11) or kept= (tokens kept after `layer`, the paper's R)"
            )
        check_budget(self.budget, self.ratio)
        check_type("layer", self.layer, is_int, "a decoder layer index such as 2")
        check_type("kept", self.kept, is_int, "a number of visual tokens such as 64", optional=True)
        if self.kept is not None and self.kept < 1:
            raise ValueError(f"kept must be at least 1, got {self.kept}")
        if self.layer < 1:
            raise ValueError(f"layer must be at least 1 (the score is layer K-1's attention), got {self.layer}")

    def kept_after(self, n: int, num_layers: int) -> int:
        """R: visual tokens kept after the cut of an image of n tokens on an L-layer model."""
        if self.kept is not None:
            return min(n, self.kept)
        mean, k = mean_budget(self.budget, self.ratio, n), self.layer
        if mean >= n:
            return n
        exact = tokens_after(mean, n, k, num_layers)
        if exact < 1:
            floor = (k * n + num_layers - k) / num_layers
            raise BudgetUnreachable(
                f"FastV cannot reach a mean of {mean:g} visual tokens per layer on a {n}-token image: all {n} pass "
                f"through {first_layers(k)}, so the mean is at least {floor:.1f}; raise the budget, lower "
                f"layer (now {k}), or give kept= (tokens kept after layer {k})"
            )
        return round(exact)

    def schedule(self, num_layers: int, model_type: str = "") -> Schedule:
        k = self.layer
        check_stage_layer(k, num_layers)
        check_ratio_reachable("FastV", self.ratio, k, num_layers, "raise the ratio, lower layer, or give kept=")

        def plan(ctx: StageContext, requests: list[StageRequest]) -> list[ReductionPlan]:
            hidden, rotary = ctx.previous
            scores = last_query_attention(ctx.layers[k - 1], hidden, rotary, ctx.valid)  # (B, S), once for all
            return [top_scores_plan(scores[r.row, r.positions][None], r.keep) for r in requests]

        stage = DecoderStage(k, lambda n: self.kept_after(n, num_layers), plan, name="fastv", reads_previous_layer=True,
                           reads_last_token=True, flops=last_query_attention_flops)
        return Schedule(num_layers, lambda n: n, stages=(stage,))
