"""The attention each row of one sequence receives (softmax per head, mean over heads, sum over queries)."""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 21  # logits per row chunk (8 MiB in float32): the chunk's softmax stays in cache


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Attention each row receives: softmax per head, mean over heads, sum over query rows.

    q, k: (H, s, d) float32 of one attention segment. Returns (s,). Computed in chunks of query rows
    of about `chunk_elements` logits, whose softmax stays in cache; the scale is applied to the
    queries, not to the logits.
    """
    heads, length = q.shape[:2]
    q, keys_t = q * scale, k.transpose(1, 2)
    step = max(1, chunk_elements // (heads * length))
    total = q.new_zeros(length)
    for start in range(0, length, step):
        total += (q[:, start : start + step] @ keys_t).softmax(dim=-1).sum(dim=(0, 1))
    return total / heads
