"""The FlashAttention stand-in itself (tests/flash_stand_in.py): its kernels against attention written out, and the fixture
leaving transformers as it found it."""
from __future__ import annotations

import torch
from transformers import modeling_flash_attention_utils as fa_utils

import flash_stand_in
from families import built


def reference(q, k, v, causal: bool) -> torch.Tensor:
    """One sequence, written out: q (S_q, H, d), k and v (S_k, H_kv, d); a causal query i sees key j when
    j <= i + S_k - S_q (flash-attn's bottom-right alignment)."""
    heads = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(heads, dim=1), v.repeat_interleave(heads, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    if causal:
        i, j = torch.arange(q.shape[0])[:, None], torch.arange(k.shape[0])[None]
        logits = logits.masked_fill(j > i + k.shape[0] - q.shape[0], float("-inf"))
    return torch.einsum("hqk,khd->qhd", logits.softmax(-1), v)


def test_kernels_equal_attention_written_out_with_cached_keys():
    """Two sequences of 3 and 2 queries after 4 and 1 cached keys, grouped-query heads (4 on 2)."""
    generator = torch.Generator().manual_seed(0)
    lengths_q, lengths_k = [3, 2], [7, 3]
    q = torch.randn(sum(lengths_q), 4, 8, generator=generator)
    k, v = (torch.randn(sum(lengths_k), 2, 8, generator=generator) for _ in range(2))
    cu_q, cu_k = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([0, 7, 10], dtype=torch.int32)
    for causal in (False, True):
        out = flash_stand_in.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 7, causal=causal)
        expected = torch.cat([reference(q[:3], k[:7], v[:7], causal), reference(q[3:], k[7:], v[7:], causal)])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        fixed = flash_stand_in.flash_attn_func(q[None, :3], k[None, :7], v[None, :7], causal=causal)[0]
        torch.testing.assert_close(fixed, expected[:3], rtol=1e-5, atol=1e-5)


def test_the_stand_in_restores_transformers():
    """The swap is undone on exit: the loader and everything it cached are transformers' again."""
    saved = {name: getattr(fa_utils, name) for name in flash_stand_in._CACHED + ("_lazy_imports",)}
    with flash_stand_in.flash_kernels():
        assert fa_utils._lazy_imports is flash_stand_in._stand_in_imports
        with torch.no_grad():
            built("llava", "flash_attention_2").model.language_model(inputs_embeds=torch.randn(1, 4, 64))
        assert fa_utils._flash_fn is flash_stand_in.flash_attn_func
    assert {name: getattr(fa_utils, name) for name in saved} == saved
