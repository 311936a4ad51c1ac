"""Analytic prefill FLOPs of the language model and of the selection (multiply-add = 2 FLOPs).

Counts the matrix products, with attention over the full S x S square (as dense kernels compute
it; causal halving is not assumed), per batch row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Widths:
    """hidden D, heads H, key/value heads H_kv, head dim d, MLP width I (gated MLP: 3 matrices)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @staticmethod
    def of(text_config: Any) -> "Widths":
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        return Widths(text_config.hidden_size, heads, kv_heads, head_dim, text_config.intermediate_size)


def decoder_layer_flops(w: Widths, rows: int, keys: int | None = None) -> int:
    """One decoder layer on `rows` new rows attending to `keys` keys (default: the same rows)."""
    keys = rows if keys is None else keys
    projections = 2 * rows * w.hidden * (2 * w.heads * w.head_dim + 2 * w.kv_heads * w.head_dim)
    attention = 2 * 2 * w.heads * rows * keys * w.head_dim
    mlp = 2 * 3 * rows * w.hidden * w.intermediate
    return projections + attention + mlp


def selector_flops(w: Widths, rows: int, rank: int | None, items: int = 1) -> int:
    """One ALVTS selector over `rows` rows: (low-rank) q/k projections, the causal half of the S x S
    logits (the chunked score computes keys up to each chunk's last row only), and the
    received-attention sums per item and for the text. rank None is a full-rank (oracle) projection."""
    if rank is None:
        projections = 2 * rows * w.hidden * (w.heads + w.kv_heads) * w.head_dim
    else:
        projections = 2 * rows * rank * (2 * w.hidden + (w.heads + w.kv_heads) * w.head_dim)
    pairs = rows * (rows + 1) // 2
    logits = 2 * w.heads * pairs * w.head_dim
    received = 2 * (1 + items) * pairs
    return projections + logits + received


def apet_flops(n: int, keep: int, num_basis: int, dim: int) -> int:
    """ApET's operator on n tokens of width dim keeping `keep`: FPS, the ridge solve, the error,
    the cosine assignment of the dropped tokens and the weighted merge."""
    k = num_basis
    fps = 3 * k * n * dim
    solve = 2 * k * k * dim + 2 * k * n * dim + 2 * k**3 + 2 * k * n * dim + 3 * n * dim
    assign = 3 * n * dim + 2 * (n - keep) * (keep - k) * dim
    merge = 2 * keep * n * dim
    return fps + solve + assign + merge
