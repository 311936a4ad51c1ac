"""ALVTS's contract on the other model families (per-layer routing only touches the language model,
so every family's layer structure allows it): keep-all identity, cached generation equal to a held
recomputation, a batch equal to its rows, SDPA equal to eager, pinned tokens always routed."""
from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from contract import check_attention_implementations, check_batch_equals_rows, check_keep_all, forward_logits, greedy
from tiny_llava_next import KINDS, SIZES, anyres_inputs, row_inputs, tiny_anyres
from tiny_qwen import MODEL_TYPES, qwen_inputs, row, tiny_qwen

ALVTS = ts.ALVTS(ratio=0.2, start_layer=0, rank=8)


def check_cached_equals_held(model, inputs: dict, method, steps: int = 4) -> None:
    with ts.compress(model, method) as handle:
        first = forward_logits(model, inputs).argmax(-1)
        cached = greedy(model, inputs, steps)
        handle.hold_selection()
        held = greedy(model, inputs, steps, use_cache=False)
    assert torch.equal(cached[:, 0], first)
    assert torch.equal(cached, held), (cached, held)


@pytest.fixture(scope="module", params=KINDS)
def anyres(request):
    model = tiny_anyres(request.param)
    batch = anyres_inputs(model, [(5, 6), (3, 4)], SIZES)
    return request.param, model, batch


def test_anyres_keep_all(anyres):
    _, model, batch = anyres
    check_keep_all(model, batch, ts.ALVTS(ratio=1.0, rank=4))


def test_anyres_cached_equals_held(anyres):
    _, model, batch = anyres
    check_cached_equals_held(model, batch, ALVTS)


def test_anyres_batch_equals_rows(anyres):
    _, model, batch = anyres
    check_batch_equals_rows(model, batch, [row_inputs(batch, 0), row_inputs(batch, 1)], ALVTS, steps=3)


def test_anyres_newlines_are_routed_through_every_layer(anyres):
    _, model, batch = anyres
    with ts.compress(model, ALVTS) as handle:
        forward_logits(model, batch)
    for item, kept in zip(handle.stats.items, handle.stats.kept):
        newlines = item.pinned.nonzero().flatten()
        assert newlines.numel() > 0
        for layer in range(len(model.model.language_model.layers)):
            assert set(newlines.tolist()) <= set(kept[f"layer{layer}"].tolist())


def test_anyres_sdpa_equals_eager(anyres):
    kind, _, batch = anyres
    check_attention_implementations(lambda attn: tiny_anyres(kind, attn), batch, ALVTS, steps=3)


@pytest.fixture(scope="module", params=MODEL_TYPES)
def qwen(request):
    model = tiny_qwen(request.param)
    return request.param, model, qwen_inputs(request.param, [(3, (16, 16), 4), (2, (16, 20), 3)])


def test_qwen_keep_all(qwen):
    _, model, batch = qwen
    check_keep_all(model, batch, ts.ALVTS(ratio=1.0, rank=4))


def test_qwen_cached_equals_held(qwen):
    _, model, batch = qwen
    check_cached_equals_held(model, batch, ALVTS)


def test_qwen_batch_equals_rows(qwen):
    _, model, batch = qwen
    check_batch_equals_rows(model, batch, [row(batch, 0), row(batch, 1)], ALVTS, steps=3)


def test_qwen_sdpa_equals_eager(qwen):
    kind, _, batch = qwen
    check_attention_implementations(lambda attn: tiny_qwen(kind, attn), batch, ALVTS, steps=3)
