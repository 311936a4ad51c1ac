"""ALVTS's importance score of each visual token from (approximate) attention, ALGORITHMS.md 2.1."""
from __future__ import annotations

import torch


def head_mean_attention(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention averaged over heads, in float32.

    Args:
        q: (B, H, S, d) rotated queries.
        k: (B, H_kv, S, d) rotated keys; H must be a multiple of H_kv (grouped-query attention).
        valid: (B, S) bool: False at padding (never a key; a padding query row gets zeros).
    Returns:
        (B, S, S) attention probabilities A[b, query j, key i].
    """
    q, k = q.float(), k.float()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, S, S)
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    allowed = causal & valid[:, None, None, :]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    probs = probs.nan_to_num(0.0)  # query rows with no allowed key (left padding)
    return probs.mean(dim=1) * valid[:, :, None]


def visual_token_scores(attention: torch.Tensor, item: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """S(i) = S_V2V(i) * S_T2V(i) for every visual row i (0 elsewhere).

    S_V2V(i): mean attention i receives from the visual rows of its own item (image);
    S_T2V(i): mean attention i receives from the text rows of its batch row (under the causal mask
    only text after the image contributes).

    Args:
        attention: (B, S, S) head-mean probabilities A[b, query, key].
        item: (B, S) long: visual item of each row, -1 for text.
        valid: (B, S) bool: False at padding.
    Returns:
        (B, S) float32 scores.
    """
    text = ((item < 0) & valid).float()  # (B, S)
    from_text = (text[:, None, :] @ attention).squeeze(1) / text.sum(1, keepdim=True).clamp(min=1)
    from_visual = torch.zeros_like(from_text)
    for g in item.unique().tolist():
        if g < 0:
            continue
        rows = ((item == g) & valid).float()
        received = (rows[:, None, :] @ attention).squeeze(1) / rows.sum(1, keepdim=True).clamp(min=1)
        from_visual = torch.where(item == g, received, from_visual)
    return torch.where(item >= 0, from_visual * from_text, torch.zeros_like(from_text))
