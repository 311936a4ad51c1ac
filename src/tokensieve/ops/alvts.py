"""ALVTS's importance score of each visual token from (approximate) attention, ALGORITHMS.md 2.1."""
from __future__ import annotations

import torch


def head_mean_attention(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention averaged over heads, in float32.

    One additive mask, one softmax and one head mean over the (B, H, S, S) logits. A query row that
    may see no key (left padding) is allowed its own position so the softmax stays finite; padding
    query rows are zeroed at the end.

    Args:
        q: (B, H, S, d) rotated queries.
        k: (B, H_kv, S, d) rotated keys; H must be a multiple of H_kv (grouped-query attention).
        valid: (B, S) bool: False at padding (never a key, except to itself; a padding query row gets zeros).
    Returns:
        (B, S, S) attention probabilities A[b, query j, key i].
    """
    q = q.float() * q.shape[-1] ** -0.5
    k = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    allowed = (causal & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=q.device)  # (B, S, S)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=q.device).masked_fill_(~allowed, float("-inf"))
    logits = (q @ k.transpose(-1, -2)).add_(bias[:, None])  # (B, H, S, S); matmul's backward needs no output
    return logits.softmax(dim=-1).mean(dim=1) * valid[:, :, None]


def visual_token_scores(attention: torch.Tensor, item: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """S(i) = S_V2V(i) * S_T2V(i) for every visual row i (0 elsewhere).

    S_V2V(i): mean attention i receives from the visual rows of its own item (image);
    S_T2V(i): mean attention i receives from the text rows of its batch row (under the causal mask
    only text after the image contributes). Every item's received attention is summed in one
    index_add over the visual query rows, whatever the number of items in the batch.

    Args:
        attention: (B, S, S) head-mean probabilities A[b, query, key].
        item: (B, S) long: visual item of each row, -1 for text; an item lies in one batch row.
        valid: (B, S) bool: False at padding.
    Returns:
        (B, S) float32 scores.
    """
    text = ((item < 0) & valid).float()  # (B, S)
    from_text = (text[:, None, :] @ attention).squeeze(1) / text.sum(1, keepdim=True).clamp(min=1)
    visual = (item >= 0) & valid
    rows, queries = visual.nonzero(as_tuple=True)
    groups = item[rows, queries]
    count = int(item.max().clamp(min=0)) + 1
    received = attention.new_zeros(count, attention.shape[-1]).index_add(0, groups, attention[rows, queries])
    members = torch.bincount(groups, minlength=count).clamp(min=1)[:, None]  # (G, 1)
    mean_received = received / members  # (G, S): per item, mean attention each key receives from it
    own = mean_received[item.clamp(min=0), torch.arange(item.shape[1], device=item.device)[None, :]]  # (B, S)
    return torch.where(item >= 0, own * from_text, torch.zeros_like(from_text))
