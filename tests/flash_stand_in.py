"""FlashAttention on a CPU: pure-PyTorch kernels with flash-attn's signatures behind transformers' own
FlashAttention code (docs/flash-attention.md).

transformers drives FlashAttention-2 (and -3) through `integrations.flash_attention` and
`modeling_flash_attention_utils._flash_attention_forward`, which unpads 2-D padding masks, reads
`cu_seq_lens_*` and position ids, and calls the kernels it got from `_lazy_imports`. `flash_kernels()`
swaps only `_lazy_imports` for one returning the functions below, so everything else that runs is
transformers' real FlashAttention path; `as_flash(model)` switches a model built with another
implementation to it. Nothing here is imported by the library.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import modeling_flash_attention_utils as fa_utils

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
CALLS: Counter = Counter()  # kernel calls by name ("func", "varlen"), for tests that count them
# What `lazy_import_flash_attention` caches between calls: cleared on entry, restored on exit.
_CACHED = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn", "_unpad_fn",
           "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None, causal: bool,
               window_size: tuple[int, int], softcap: float) -> torch.Tensor:
    """Sequences of equal length: q (B, S_q, H, d), k and v (B, S_k, H_kv, d) -> (B, S_q, H, d).

    The causal mask is aligned to the bottom right, as flash-attn >= 2.1 aligns it: query i sees key j
    when j <= i + S_k - S_q (a query chunk after cached keys sees all of them); a query that sees no key
    gets zeros. Computed by torch's SDPA in float32 with an explicit boolean mask."""
    if tuple(window_size) != (-1, -1) or softcap:
        raise NotImplementedError("the stand-in kernel has no sliding window or softcap")
    s_q, s_k = q.shape[1], k.shape[1]
    mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q) if causal else None
    q32, k32, v32 = (x.float().transpose(1, 2) for x in (q, k, v))  # (B, H, S, d)
    out = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, scale=softmax_scale, enable_gqa=True)
    if mask is not None and s_q > s_k:
        out = out.masked_fill(~mask.any(-1)[:, None], 0.0)
    return out.transpose(1, 2).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p: float = 0.0, softmax_scale=None, causal: bool = False, window_size=(-1, -1),
                    softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False, return_attn_probs: bool = False):
    """flash-attn 2's fixed-length kernel: q (B, S_q, H, d), k and v (B, S_k, H_kv, d) -> (B, S_q, H, d)."""
    _no_extras(dropout_p, alibi_slopes, return_attn_probs)
    CALLS["func"] += 1
    return _attention(q, k, v, softmax_scale, causal, window_size, softcap)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p: float = 0.0,
                           softmax_scale=None, causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                           alibi_slopes=None, deterministic: bool = False, return_attn_probs: bool = False,
                           block_table=None):
    """flash-attn 2's variable-length kernel: q (total_q, H, d), k and v (total_k, H_kv, d), sequence i being
    rows cu_seqlens_q[i]:cu_seqlens_q[i + 1] of q and cu_seqlens_k[i]:cu_seqlens_k[i + 1] of k -> (total_q, H, d).
    Like the kernel, it reads no row past the last bound and checks nothing against the tensors' lengths."""
    _no_extras(dropout_p, alibi_slopes, return_attn_probs)
    if block_table is not None:
        raise NotImplementedError("the stand-in kernel has no paged cache")
    CALLS["varlen"] += 1
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = [_attention(q[None, a:b], k[None, c:d], v[None, c:d], softmax_scale, causal, window_size, softcap)[0]
           for a, b, c, d in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:])]
    return torch.cat(out)


def flash_attn_3_func(q, k, v, softmax_scale=None, causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                      deterministic: bool = False):
    """flash-attn 3's fixed-length kernel (`flash_attn_interface`): as flash-attn 2's, without dropout."""
    return flash_attn_func(q, k, v, 0.0, softmax_scale, causal, window_size, softcap)


def flash_attn_3_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                             causal: bool = False, window_size=(-1, -1), softcap: float = 0.0, deterministic: bool = False):
    """flash-attn 3's variable-length kernel: as flash-attn 2's, without dropout."""
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, softmax_scale,
                                  causal, window_size, softcap)


def _no_extras(dropout_p: float, alibi_slopes, return_attn_probs: bool) -> None:
    if dropout_p or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("the stand-in kernel has no dropout, ALiBi or attention probabilities")


def _stand_in_imports(implementation, attention_wrapper=None, allow_all_kernels: bool = False):
    """`_lazy_imports`'s answer: (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, pad_input,
    unpad_input) with the signatures of the version asked for, the pad/unpad helpers being transformers' own."""
    if implementation not in FLASH_IMPLEMENTATIONS:
        raise ValueError(f"the stand-in serves {FLASH_IMPLEMENTATIONS}, not {implementation!r}")
    if implementation == "flash_attention_3":
        return flash_attn_3_func, flash_attn_3_varlen_func, None, fa_utils._pad_input, fa_utils._unpad_input
    return flash_attn_func, flash_attn_varlen_func, None, fa_utils._pad_input, fa_utils._unpad_input


@contextlib.contextmanager
def flash_kernels() -> Iterator[None]:
    """transformers' FlashAttention path served by the stand-in kernels until exit; everything restored."""
    saved = {name: getattr(fa_utils, name) for name in _CACHED + ("_lazy_imports",)}
    try:
        fa_utils._loaded_implementation = None
        fa_utils._lazy_imports = _stand_in_imports
        yield
    finally:
        for name, value in saved.items():
            setattr(fa_utils, name, value)


def as_flash(model: torch.nn.Module, implementation: str = "flash_attention_2") -> torch.nn.Module:
    """Switch `model` (and every sub-config, recursively) to a FlashAttention implementation in place.

    `model.set_attn_implementation` would look for an installed kernel; the config's setter is what it
    ends with. The model must own its config (not share it with another model instance)."""
    model.config._attn_implementation = implementation
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", implementation) != implementation:
            raise RuntimeError(f"{type(module).__name__} kept {config._attn_implementation!r}")
    return model
