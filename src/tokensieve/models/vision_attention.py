"""What a vision encoder layer's attention says of each of its rows, read outside the attention kernel.

A family names the layer behind its vision-side features (`VisionLayer`); `LayerAttention` places a
pre-hook on it that recomputes, from the layer's own input, a score and a key per row. The family
then tells the runtime, for each feature it hands the vision side, which row of that reading it came
from (`FamilyPort.plan_items(..., sources=...)`), so a method gets the evidence of exactly its rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import project, rotate
from ..ops.received_attention import received_attention
from ..runtime.hooks import HookSet
from ..runtime.schedule import VisionEvidence


@dataclass(frozen=True)
class VisionLayer:
    """The vision encoder layer behind the vision-side features.

    Attributes:
        layer: the encoder layer whose output the features come from; its input gives the attention
            and keys (CLIP/SigLIP layers take (I, S, D); Qwen ViT blocks take packed (S, D) rows with
            cu_seqlens and rotary position embeddings).
        cls: the layer's sequences start with a CLS token (CLIP): the score is the CLS row's attention.
        group: consecutive layer rows merged into one feature (Qwen's 2x2 merge: 4), else 1; the
            reading has one row per group.
    """

    layer: torch.nn.Module
    cls: bool
    group: int = 1


def clip_layer_reading(layer: torch.nn.Module, hidden: torch.Tensor, cls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and mean-head key of every row of a CLIP/SigLIP encoder layer's input hidden (I, S, D).

    Score: with a CLS token, the CLS row's attention (softmax per head, summed over heads) over every
    column; without one, the attention each row receives. Keys: k_proj of layer_norm1, mean over heads.
    Returns (I * S,) and (I * S, d), float32.
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    k = project(attn.k_proj, normed).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # (I, H, S, d)
    if cls:
        q = project(attn.q_proj, normed[:, :1]).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # (I, H, 1, d)
        score = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1).sum(dim=1)[:, 0]  # (I, S)
    else:
        q = project(attn.q_proj, normed).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
        score = torch.stack([received_attention(qi, ki, attn.scale) for qi, ki in zip(q, k)])
    return score.flatten(), k.mean(dim=1).flatten(0, 1)


def qwen_block_reading(block: torch.nn.Module, hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                       rotary: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and mean-head key of every row of a Qwen ViT block's packed input hidden (S, D).

    Score: the attention each row receives within its cu_seqlens segment (queries and keys rotated as
    the block rotates them). Keys: the block's keys before the rotary embedding (content only, as
    CLIP's), mean over heads. Returns (S,) and (S, d), float32.
    """
    attn = block.attn
    qkv = project(attn.qkv, block.norm1(hidden)).view(hidden.shape[0], 3, attn.num_heads, -1)
    q, k = (qkv[:, i].transpose(0, 1)[None] for i in (0, 1))  # (1, H, S, d)
    cos, sin = (t[None] for t in rotary)
    q_rot, k_rot = rotate(q, cos, sin)[0], rotate(k, cos, sin)[0]
    bounds = cu_seqlens.tolist()
    score = torch.cat([received_attention(q_rot[:, a:b], k_rot[:, a:b], attn.scaling) for a, b in zip(bounds, bounds[1:])])
    return score, k[0].mean(dim=0)


def group_mean(x: torch.Tensor, group: int) -> torch.Tensor:
    """Mean over consecutive runs of `group` rows: (R, ...) -> (R / group, ...)."""
    return x.unflatten(0, (-1, group)).mean(dim=1)


class LayerAttention:
    """Reads a `VisionLayer` in every vision forward; hands out the evidence of the rows asked for.

    `also`: layers of the same kind read the same way (Video-LLaVA's image and video towers, each of
    which runs right before its own features are reduced); the reading is of whichever ran last.

    Attributes:
        reading: (score (R,), keys (R, d)) of the last forward's rows (one per `group` layer rows,
            in the layer's row order), or None before the first.
    """

    def __init__(self, where: VisionLayer, also: tuple[torch.nn.Module, ...] = ()) -> None:
        self.where = where
        self.also = also
        self.reading: tuple[torch.Tensor, torch.Tensor] | None = None

    def install(self, hooks: HookSet) -> None:
        for layer in (self.where.layer, *self.also):
            hooks.pre(layer, self._read)

    def evidence(self, sources: torch.Tensor) -> VisionEvidence:
        """The score (G, n) and keys (G, n, d) of the reading's rows `sources` (G, n) long."""
        if self.reading is None:
            raise RuntimeError("the vision layer behind these features has not run yet; encode the images again")
        score, keys = self.reading
        if sources.numel() and int(sources.max()) >= score.shape[0]:
            raise RuntimeError(
                f"a feature names row {int(sources.max())} of the vision layer, which had {score.shape[0]} rows in "
                "this encoding; the family's record of where its features come from is out of date"
            )
        sources = sources.to(score.device)
        return VisionEvidence(score[sources], keys[sources])

    def _read(self, module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            if hidden.dim() == 3:
                mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
                if mask is not None:
                    raise RuntimeError("reading the vision attention does not support an attention mask in the encoder")
                score, keys = clip_layer_reading(module, hidden, self.where.cls)
            else:
                score, keys = qwen_block_reading(module, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"])
        self.reading = (group_mean(score, self.where.group), group_mean(keys, self.where.group))
