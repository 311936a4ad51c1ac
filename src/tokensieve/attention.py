"""A decoder layer's queries and keys computed outside its attention kernel, as the layer computes them.

Methods that read attention (ALVTS's selectors, FastV, PyramidDrop, DART) use these so the model
itself keeps running SDPA or FlashAttention: the layer's input layernorm, q/k projections (with
bias), per-head q/k norms where the model has them (Qwen3) and rotary embedding are applied here.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Projection(Protocol):
    def project(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...


def project(linear: torch.nn.Linear, x: torch.Tensor, low_rank: Projection | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """linear(x), or its low-rank stand-in (the bias is kept), returned in `dtype`: (..., D_in) -> (..., D_out)."""
    if low_rank is None:
        return linear(x.to(linear.weight.dtype)).to(dtype)
    out = low_rank.project(x, dtype)
    return out + linear.bias.to(dtype) if linear.bias is not None else out


def split_heads(attn: torch.nn.Module, x: torch.Tensor, norm_name: str) -> torch.Tensor:
    """(B, S, H * d) -> (B, H, S, d), through the model's per-head norm `norm_name` if it has one."""
    dtype = x.dtype
    x = x.view(*x.shape[:2], -1, attn.head_dim)
    norm = getattr(attn, norm_name, None)
    if norm is not None:
        x = norm(x.to(norm.weight.dtype)).to(dtype)
    return x.transpose(1, 2)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on (B, H, S, d) with cos/sin (B or 1, S, d), in x's dtype."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    half = x.shape[-1] // 2
    out = x * cos  # + rotate_half(x) * sin, written into the halves without building rotate_half(x)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def queries_keys(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    query_rows: torch.Tensor | None = None,
    low_rank: tuple[Projection, Projection] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated queries and keys of a decoder layer on its input `hidden` (B, S, D).

    Args:
        rotary: (cos, sin), each (B or 1, S, d), of the rows of `hidden`.
        query_rows: (Q,) row indices whose queries are wanted (None: all rows).
        low_rank: (query, key) low-rank stand-ins for W_Q and W_K (ALVTS selectors), or None.
        dtype: what the projections return and the rotation computes in.
    Returns:
        q (B, H, Q, d) and k (B, H_kv, S, d) in `dtype`.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    cos, sin = rotary
    queries_in = normed if query_rows is None else normed[:, query_rows]
    q_cos, q_sin = (cos, sin) if query_rows is None else (cos[:, query_rows], sin[:, query_rows])
    q = split_heads(attn, project(attn.q_proj, queries_in, low_rank and low_rank[0], dtype), "q_norm")
    k = split_heads(attn, project(attn.k_proj, normed, low_rank and low_rank[1], dtype), "k_norm")
    return rotate(q, q_cos, q_sin), rotate(k, cos, sin)


def last_query_attention(layer: torch.nn.Module, hidden: torch.Tensor, rotary, valid: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of each row's last position over all keys, mean over heads, computed
    outside the kernel so the model keeps SDPA. The last position must be the last prompt token: the
    runtime refuses rows that end in padding before the first decoder layer.

    Softmax per head in float32; keys at padding (valid False) get nothing. The last position sees
    every earlier one, so no causal mask is needed.

    Args:
        hidden: (B, S, D) the layer's input; rotary: its (cos, sin); valid: (B, S) bool.
    Returns:
        (B, S) float32.
    """
    q, k = queries_keys(layer, hidden, rotary, query_rows=torch.tensor([hidden.shape[1] - 1], device=hidden.device))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, 1, S)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def last_query_attention_flops(n: int, keep: int, width: int) -> int:
    """About, per image of n rows: their keys (2 n D^2, an upper bound under grouped-query attention),
    the last row's query (2 D^2) and that query's logits over the n rows (2 n D). `keep` is unused."""
    return 2 * n * width * width + 2 * width * width + 2 * n * width
