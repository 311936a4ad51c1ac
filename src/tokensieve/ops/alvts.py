"""ALVTS's importance score of each visual token from (approximate) attention (docs/methods.md, "The ALVTS score")."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .received_attention import CHUNK_ELEMENTS

V2V_ROWS = ("all", "attending")  # what S_V2V(i) divides by: all rows of i's image, or those at or after i


def row_weights(item: torch.Tensor, valid: torch.Tensor, max_items: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows each score averages over, per batch row.

    Args:
        item: (B, S) long: visual item of each row, -1 for text; an item lies in one batch row.
        valid: (B, S) bool: False at padding.
        max_items: I when the caller knows it (None: read from `item`, one device-to-host copy).
    Returns:
        weights (B, 1 + I, S) float32: group 0 is the row's valid text, group 1 + g its g-th item
        (items numbered from 0 within each batch row, I the most items in one row);
        local (B, S) long: the in-row item number of each row, -1 for text.
    """
    first = torch.where(item >= 0, item, item.new_tensor(torch.iinfo(item.dtype).max)).amin(1, keepdim=True)
    local = torch.where(item >= 0, item - first, item.new_tensor(-1))
    groups = 1 + (int(local.max()) + 1 if max_items is None else max_items)
    group = torch.arange(groups, device=item.device)[None, :, None]
    weights = ((local + 1)[:, None, :] == group).float() * valid[:, None, :]  # one-hot without one_hot's range read
    return weights, local


def alvts_scores(q: torch.Tensor, k: torch.Tensor, item: torch.Tensor, valid: torch.Tensor,
                 max_items: int | None = None, v2v_rows: str = "all") -> torch.Tensor:
    """S(i) = S_V2V(i) * S_T2V(i) for every visual row i (0 elsewhere), from queries and keys.

    A is the causal softmax attention averaged over heads: logits in q's dtype, softmax and sums in
    float32. S_V2V(i) is the mean of A(j, i) over the rows j of i's own item (image), S_T2V(i) the
    mean over the text rows of its batch row (under the causal mask only text after the image
    contributes). The rows are taken in
    chunks: a chunk of rows ending at row r needs only the keys before r (half the logits of the
    full square), each chunk's logits, mask and softmax stay in cache, and the (B, H, S, S) map is
    never held. A query row that may see no key (left padding) is allowed its own position so the
    softmax stays finite; padding rows weigh nothing.

    Args:
        q: (B, H, S, d) rotated queries.
        k: (B, H_kv, S, d) rotated keys; H must be a multiple of H_kv (grouped-query attention).
        item: (B, S) long: visual item of each row, -1 for text; an item lies in one batch row.
        valid: (B, S) bool: False at padding (never a key, except to itself).
        max_items: the most items in one batch row, when the caller knows it on the host (no sync).
        v2v_rows: "all" divides S_V2V(i)'s sum by all N rows of i's image (the default); "attending"
            by the rows of that image that can attend to i under the causal mask (i itself and the
            ones after it), so early tokens are not favoured for having more rows able to see them.
    Returns:
        (B, S) float32 scores.
    """
    batch, heads, length, dim = q.shape
    q = q.contiguous() * dim ** -0.5  # contiguous rows: each chunk's matmul reads them without a copy
    k = k.to(q.dtype).repeat_interleave(heads // k.shape[1], dim=1).contiguous()
    weights, local = row_weights(item, valid, max_items)
    position = torch.arange(length, device=q.device)
    step = max(1, CHUNK_ELEMENTS // (batch * heads * length))
    sums = weights.new_zeros(weights.shape)  # (B, 1 + I, S): attention each key receives, summed per group
    for start in range(0, length, step):
        stop = min(length, start + step)
        rows, keys = position[start:stop, None], position[None, :stop]
        allowed = (keys <= rows) & (valid[:, None, :stop] | (keys == rows))  # (B, R, stop)
        logits = (q[:, :, start:stop] @ k[:, :, :stop].transpose(-1, -2)).masked_fill_(~allowed[:, None], float("-inf"))
        attention = logits.softmax(dim=-1, dtype=torch.float32).mean(dim=1)  # (B, R, stop)
        sums = sums + F.pad(weights[:, :, start:stop] @ attention, (0, length - stop))
    means = sums / weights.sum(-1, keepdim=True).clamp(min=1)
    own = means[:, 1:].gather(1, local.clamp(min=0)[:, None, :]).squeeze(1)  # V2V of each row's own item
    if v2v_rows == "attending":
        own = attending_v2v(sums, weights, local)
    return torch.where((item >= 0) & valid, own * means[:, 0], torch.zeros_like(own))


def attending_v2v(sums: torch.Tensor, weights: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """S_V2V(i) divided by the valid rows of i's own item at or after i (those the causal mask lets attend to i).

    sums, weights: (B, 1 + I, S) as in `alvts_scores`; local: (B, S) in-row item number, -1 for text.
    Returns (B, S) float32 (text rows: meaningless, masked by the caller).
    """
    later = weights[:, 1:].flip(-1).cumsum(-1).flip(-1)  # (B, I, S): rows of item g at positions >= s
    index = local.clamp(min=0)[:, None, :]
    return (sums[:, 1:].gather(1, index) / later.gather(1, index).clamp(min=1)).squeeze(1)
