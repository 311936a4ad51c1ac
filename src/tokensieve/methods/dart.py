"""DART: token pruning by duplication, inside the language model before layer K (docs/methods.md, "DART")."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import queries_keys, rotate
from ..ops.plan import ReductionPlan, selection_plan
from ..runtime.schedule import BudgetUnreachable, DecoderStage, Schedule, StageContext, StageRequest
from .base import (
    check_budget, check_ratio_reachable, check_stage_layer, check_type, first_layers, is_int, mean_budget,
    tokens_after,
)


def pivot_keys(layer: torch.nn.Module, hidden: torch.Tensor, rotary, valid: torch.Tensor) -> torch.Tensor:
    """A decoder layer's keys after RoPE, heads concatenated (GQA keys not repeated).

    The keys are rotated to positions counted from each row's first valid token, as the authors'
    unpadded single prompt has them: where the model already counts so (generate, Qwen's M-RoPE) this
    is the identity; a left-padded plain forward (positions 0..S-1 shared by the batch) would
    otherwise give a padded prompt other L1 norms than the same prompt alone.

    Args:
        hidden: (B, S, D) the layer's input; rotary: its (cos, sin), each (B or 1, S, d); valid: (B, S) bool.
    Returns:
        (B, S, H_kv * d) float32.
    """
    batch, length = hidden.shape[:2]
    last = torch.tensor([length - 1], device=hidden.device)
    _, keys = queries_keys(layer, hidden, rotary, query_rows=last)  # (B, H_kv, S, d)
    first = valid.int().argmax(dim=1)  # (B,) first valid row
    rows = torch.arange(batch, device=hidden.device)
    cos, sin = (t.expand(batch, -1, -1)[rows, first][:, None] for t in rotary)  # (B, 1, d)
    keys = rotate(keys, cos, -sin)  # R(-p0) R(p) = R(p - p0)
    return keys.transpose(1, 2).reshape(batch, length, -1)


def top_first(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest of scores (n,), largest first, ties to the lower index."""
    return scores.argsort(descending=True, stable=True)[:count]


def split_evenly(total: int, parts: int) -> list[int]:
    """total split over parts, the first total % parts of them getting one more."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def dart_keep(key_norm: torch.Tensor, states: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
              keep: int, per_side: int) -> torch.Tensor:
    """DART's kept image tokens of one item.

    Pivots: the `per_side` image tokens and the `per_side` text tokens (after the image) with the largest
    L1 key norm. The image pivots are kept; then, for each pivot in sequence order (image pivots first,
    text pivots after, each by position), the quota of remaining image candidates least cosine-similar
    to the pivot (lowest similarity first, ties to the lower index) is kept and leaves the candidates.
    The keep - (image pivots) extra tokens are split evenly over the pivots, the earlier pivots taking
    the remainder: 4 + 8 * q reproduces the authors' q per pivot exactly.

    Args:
        key_norm: (S,) L1 norm of each row's keys; states: (S, D) float32 final-norm hidden states.
        image: (n,) rows of the image's tokens (ascending); text: (t,) rows of the text after it (ascending).
        keep: image tokens to keep (image pivots + picks); per_side: pivots of each kind.
    Returns:
        (keep,) long ascending indices into `image`.
    """
    image_pivots = top_first(key_norm[image], min(per_side, keep)).sort().values
    text_pivots = text[top_first(key_norm[text], min(per_side, text.numel()))].sort().values
    pivots = torch.cat([image[image_pivots], text_pivots])
    candidate = torch.ones(image.numel(), dtype=torch.bool, device=image.device)
    candidate[image_pivots] = False
    chosen, left = [image_pivots], image.numel() - image_pivots.numel()  # candidates left, counted on the host
    for p, quota in enumerate(split_evenly(keep - image_pivots.numel(), pivots.numel())):
        pool = torch.sort((~candidate).to(torch.uint8), stable=True).indices[:left]  # the candidates, ascending
        similarity = F.cosine_similarity(states[pivots[p : p + 1]], states[image[pool]], dim=-1)
        picked = pool[similarity.argsort(stable=True)[:quota]]
        candidate[picked] = False
        chosen.append(picked)
        left -= picked.numel()
    return torch.cat(chosen).sort().values


def text_after(ctx: StageContext, request: StageRequest) -> torch.Tensor:
    """(t,) rows of the valid text tokens after the request's image in its batch row."""
    row = request.row
    after = torch.arange(ctx.item.shape[1], device=ctx.item.device) > request.positions.max()
    return ((ctx.item[row] < 0) & ctx.valid[row] & after).nonzero().flatten()


@dataclass(frozen=True)
class DART:
    """Before decoder layer K, keep the image tokens least duplicated by a few pivot tokens.

    Paper: https://arxiv.org/abs/2502.11494 (EMNLP 2025), "Stop Looking for Important Tokens in
    Multimodal Language Models: Duplication Matters More". As implemented here: docs/methods.md, "DART".

    Reads layer K-1's keys after RoPE (its own input layernorm, k_proj and rotary on its input, heads
    concatenated, GQA keys not repeated; see `pivot_keys` for the positions) and layer K-1's output
    through the language model's final norm, (B, S, D). Pivots: the pivots/2 image tokens and the
    pivots/2 text tokens after the image (in the same row, other images excluded) with the largest L1
    key norm; the selection is `dart_keep`, with a fixed pivot order (sequence order) where the authors
    iterate a Python set. Attention-free: SDPA and FlashAttention stay on. Original position ids are
    kept (gaps remain), as in the authors' code. With a KV cache it prunes once, at prefill; since the
    text pivots read the prompt, decoding without a cache would select differently (hold the
    selection with `tokensieve.methods.replay.Replay`).

    Budget semantics: `budget` (tokens) or `ratio` (fraction of an image's n tokens) is the mean number
    of visual tokens per decoder layer, per image, b. Layers 0..K-1 process all n, the L - K others
    R = round((b * L - K * n) / (L - K)). On LLaVA-1.5-7B (576 tokens, 32 layers, K = 2) budgets
    192/128/64 keep R = 166/98/30 after layer 2. The authors' convention names a count t and keeps
    R = pivots/2 + pivots * ceil(t / pivots): their "192"/"128"/"64" keep 196/132/68 after layer 2, means
    of 219.75/159.75/99.75 per layer (so `DART(budget=159.75)` is their "128"). A budget below
    (K * n + (L - K) * pivots/2) / L (39.75 for 576 tokens, K = 2, 32 layers) is a ValueError.
    `ratio=1.0` keeps everything. Items of n <= R tokens are untouched.

    Families: every family (LLaVA-1.5; LLaVA-NeXT/OneVision, whose image newlines are always kept and
    are neither candidates nor pivots; Qwen2/2.5/3-VL with M-RoPE, per image or video frame group).
    On Qwen3-VL the cut must come after its deepstack layers (`layer=4` or later on
    the released models, which add 3); the default is refused there with that fix.

    Attributes:
        layer: K, the first decoder layer that sees the pruned sequence (1 <= K < L).
        pivots: pivot tokens, half image and half text (even, >= 2).
    """

    budget: float | None = None
    ratio: float | None = None
    layer: int = 2
    pivots: int = 8

    def __post_init__(self) -> None:
        if self.budget is None and self.ratio is None:
            raise ValueError("DART needs a budget (mean visual tokens per layer, e.g. budget=128) or a ratio (e.g. 0.22)")
        check_budget(self.budget, self.ratio)
        check_type("layer", self.layer, is_int, "a decoder layer index such as 2")
        check_type("pivots", self.pivots, is_int, "an even number of pivot tokens such as 8")
        if self.layer < 1:
            raise ValueError(f"layer must be at least 1 (DART reads layer K-1), got {self.layer}")
        if self.pivots < 2 or self.pivots % 2:
            raise ValueError(f"pivots must be an even number of at least 2 (half image, half text), got {self.pivots}")

    def kept_after(self, n: int, num_layers: int) -> int:
        """R: visual tokens an image of n tokens keeps after layer K on an L-layer model."""
        mean, k, side = mean_budget(self.budget, self.ratio, n), self.layer, self.pivots // 2
        if mean >= n:
            return n
        kept = round(tokens_after(mean, n, k, num_layers))
        if kept < min(n, side):
            floor = (k * n + (num_layers - k) * side) / num_layers
            raise BudgetUnreachable(
                f"DART cannot reach a mean of {mean:g} visual tokens per layer on a {n}-token image: all {n} pass "
                f"through {first_layers(k)} and layers {k}.. keep at least its {side} image pivots, a mean of at least "
                f"{floor:g}; raise the budget or lower layer (now {k})"
            )
        return kept

    def schedule(self, num_layers: int, model_type: str = "") -> Schedule:
        k = self.layer
        check_stage_layer(k, num_layers)
        check_ratio_reachable("DART", self.ratio, k, num_layers, "raise the ratio or lower layer")
        stage = DecoderStage(k, lambda n: self.kept_after(n, num_layers), self._plan, name="dart",
                           reads_previous_layer=True, flops=self._flops)
        return Schedule(num_layers, lambda n: n, stages=(stage,), min_keep=self.pivots // 2)

    def _plan(self, ctx: StageContext, requests: list[StageRequest]) -> list[ReductionPlan]:
        """One selection plan per request, from keys and normed states computed once for the batch."""
        if ctx.norm is None or ctx.previous is None or ctx.previous[1] is None:
            raise ValueError("DART needs the language model's final norm and layer K-1's rotary embeddings")
        hidden, rotary = ctx.previous
        key_norm = pivot_keys(ctx.layers[self.layer - 1], hidden, rotary, ctx.valid).abs().sum(-1)  # (B, S)
        states = ctx.norm(ctx.hidden).float()  # (B, S, D)
        plans = []
        for r in requests:
            kept = dart_keep(key_norm[r.row], states[r.row], r.positions, text_after(ctx, r), r.keep, self.pivots // 2)
            plans.append(selection_plan(kept[None]))
        return plans

    def _flops(self, n: int, keep: int, width: int) -> int:
        """About: the keys of the image rows (2 n D^2, an upper bound for GQA), their L1 norms and the
        cosine similarities of each pivot to the remaining candidates (3 n D each)."""
        return 2 * n * width * width + n * width + self.pivots * 3 * n * width
