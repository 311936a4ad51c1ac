"""VisionZip: dominant tokens by the vision encoder's attention, the rest merged into contextual tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.plan import ReductionPlan, selection_plan
from ..runtime.schedule import Schedule, VisionEvidence
from .base import check_budget, check_type, is_real, kept_tokens

AUTHORS_CONTEXTUAL = 10 / 64  # 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30 (and per NeXT crop: 32 = 27 + 5)


# ---------------------------------------------------------------------------------- the plan (pure maths)
def contextual_count(keep: int, share: float) -> int:
    """Contextual tokens among `keep`: share * keep, halves rounded up."""
    return int(share * keep + 0.5)


def dominant_contextual_plan(score: torch.Tensor, keys: torch.Tensor, keep: int, contextual: int) -> ReductionPlan:
    """VisionZip's reduction of G items of n tokens to `keep` = D + C slots.

    Dominant: the D = keep - contextual highest scores (ties to the lower index), kept as they are.
    Contextual: of the M = n - D other tokens in index order, C targets evenly spaced in that list
    (step max(1, M // C), the first C); every other remaining token goes to its most cosine-similar
    target by `keys` (ties to the first target); each target's slot becomes its own features plus the
    mean of the tokens assigned to it (weights 1 and 1/count; the target weighs as much as its group).

    Args:
        score: (G, n) float; keys: (G, n, d) float.
    Returns:
        ReductionPlan with kept_index (G, keep) ascending (a contextual token sits at its target's
        place) and weights (G, keep, n), or a plain selection when contextual is 0.
    """
    n = score.shape[1]
    dominant = score.argsort(dim=1, descending=True, stable=True)[:, : keep - contextual]  # (G, D)
    if contextual == 0:
        return selection_plan(dominant)
    is_dominant = torch.zeros_like(score, dtype=torch.bool).scatter_(1, dominant, True)
    rest = is_dominant.to(torch.uint8).argsort(dim=1, stable=True)[:, : n - dominant.shape[1]]  # (G, M) ascending
    slots = torch.arange(0, rest.shape[1], max(1, rest.shape[1] // contextual), device=score.device)[:contextual]
    is_slot = torch.zeros(rest.shape[1], dtype=torch.bool, device=score.device)
    is_slot[slots] = True
    targets, others = rest[:, is_slot], rest[:, ~is_slot]  # (G, C), (G, M - C)
    unit = F.normalize(keys.float(), dim=-1)
    similarity = gather_rows(unit, others) @ gather_rows(unit, targets).transpose(1, 2)  # (G, M - C, C)
    owner = targets.gather(1, similarity.argmax(dim=-1))  # (G, M - C) target token of each other token
    weights = merge_weights(n, dominant, targets, others, owner)
    kept = torch.cat([dominant, targets], dim=1).sort(dim=1).values
    return ReductionPlan(kept, weights.gather(1, kept[..., None].expand(-1, -1, n)))


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (G, n, d) at index (G, k) -> (G, k, d)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def merge_weights(n: int, dominant, targets, others, owner) -> torch.Tensor:
    """(G, n, n): row t holds what slot t is made of (dominant and target rows 1 on themselves, each
    other token 1/|group| on its owner's row); index tensors (G, *) as in `dominant_contextual_plan`."""
    groups = dominant.shape[0]
    batch = torch.arange(groups, device=dominant.device)[:, None]
    weights = torch.zeros(groups, n, n, device=dominant.device)
    weights[batch, dominant, dominant] = 1.0
    weights[batch, targets, targets] = 1.0
    counts = torch.zeros(groups, n, device=dominant.device).scatter_add_(1, owner, torch.ones_like(owner, dtype=torch.float))
    weights[batch, owner, others] = 1.0 / counts.gather(1, owner)
    return weights


@dataclass(frozen=True)
class VisionZip:
    """Keep the tokens the vision encoder attends to most; merge the rest into a few contextual tokens.

    Paper: https://arxiv.org/abs/2412.04467 (CVPR 2025), "VisionZip: Longer is Better but Not
    Necessary in Vision Language Models". As implemented here: docs/methods.md, "VisionZip".

    Acts on the vision side (stage 1), on the features the family reduces, which must all come from one
    encoder layer (`Family.vision_feature_layer`: LLaVA's vision_feature_layer, -2 = layer 22 of 24;
    Qwen's last ViT block). The family reads that layer (`tokensieve.models.vision_attention`): a
    pre-hook computes from the layer's own input, with its own layernorm and q/k projections (the tower
    keeps its attention kernel; nothing is switched to eager), and the family says which row each
    feature came from; the plan receives, per feature (`VisionEvidence`):
    - the score: the CLS row's attention (softmax per head, summed over heads) over the patches; where
      the encoder has no CLS (SigLIP, Qwen), the attention each token receives (mean over heads, sum
      over query rows); on Qwen, averaged over each 2x2 merge group;
    - the keys: k_proj of the layer's input after its first layernorm, mean over heads (Qwen: per
      merge group, before the rotary embedding).
    Attention, keys and features thus come from the same layer. Of an item's n features the D
    highest-scoring are dominant; the rest are merged into C contextual tokens
    (`dominant_contextual_plan`). A contextual token takes its target's place (the runtime keeps
    original positions; Qwen keeps the target's M-RoPE position), so the output is in position order
    rather than the authors' [CLS, dominant, contextual].

    CLS: the authors' code hands the CLS token to the language model as one of the D dominant tokens
    (CLS + D - 1 patches); as LightCompress does, it is not handed on here, and the D dominant tokens
    are all patches. The token count is the same: D + C.

    Budget semantics: `budget` (tokens) or `ratio` (fraction of an item's n tokens) is the mean number
    of visual tokens per decoder layer, per image, b: every decoder layer processes round(b) (VisionZip
    acts before the language model, so this is also the literature's count). By default each reduced
    part keeping k tokens makes C = k * 10/64 of them contextual (halves up): on LLaVA-1.5 (576 tokens)
    192 = 162 + 30, 128 = 108 + 20, 64 = 54 + 10. On LLaVA-NeXT the family splits an image's budget
    over its crops in proportion to their tokens and each crop is reduced alone with the same share
    (the authors' 128 = 108 + 20 and 32 = 27 + 5 per crop). Qwen: per image or video frame group.
    `ratio=1.0` keeps everything.

    Families: LLaVA-1.5 and LLaVA-NeXT (CLIP; `vision_feature_select_strategy="default"`, one feature
    layer), Qwen2-VL, Qwen2.5-VL and Qwen3-VL (no CLS: attention received in the last ViT block; Qwen3's
    deepstack features follow the same plan). Not LLaVA-OneVision: its large images' tile tokens are
    interpolated after the projector, so they are no vision layer's rows (ValueError at compress time).

    Attributes:
        contextual: share of each reduced part's kept tokens that are contextual (None: the authors'
            10/64).
    """

    budget: float | None = None
    ratio: float | None = None
    contextual: float | None = None

    def __post_init__(self) -> None:
        if self.budget is None and self.ratio is None:
            raise ValueError("VisionZip needs a budget (visual tokens per layer, e.g. budget=64) or a ratio (e.g. 0.11)")
        check_budget(self.budget, self.ratio)
        check_type("contextual", self.contextual, is_real, "a share of the kept tokens in [0, 1) such as 0.15625",
                   optional=True)
        if self.contextual is not None and not 0.0 <= self.contextual < 1.0:
            raise ValueError(
                f"contextual is the share of the kept tokens that are contextual, in [0, 1) (the authors': 10/64); "
                f"got {self.contextual}"
            )

    @property
    def share(self) -> float:
        return AUTHORS_CONTEXTUAL if self.contextual is None else self.contextual

    def schedule(self, num_layers: int, model_type: str = "") -> Schedule:
        def keep(n: int) -> int:
            return kept_tokens(self.budget, self.ratio, n)

        def plan(x: torch.Tensor, keep: int, evidence: VisionEvidence | None = None) -> ReductionPlan:
            return dominant_contextual_plan(evidence.score, evidence.keys, keep, contextual_count(keep, self.share))

        return Schedule(num_layers, keep, plan, vision_plan_flops=self._flops, reads_vision_attention=True)

    def _flops(self, n: int, keep: int, width: int) -> int:
        """About: the keys and score row of the read layer (2 n D^2 + 2 n D), the similarities of the
        remaining tokens to the targets and the weighted merge (2 keep n D)."""
        c = contextual_count(keep, self.share)
        return 2 * n * width * width + 2 * n * width + 2 * (n - keep) * c * width + 2 * keep * n * width
