"""ALVTS's contract on the other model families (per-layer routing only touches the language model,
so every family's layer structure allows it): keep-all identity, cached generation equal to a held
recomputation, a batch equal to its rows, SDPA equal to eager, pinned tokens always routed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import tokensieve as ts
from contract import check_attention_implementations, check_batch_equals_rows, check_keep_all, forward_logits, greedy
from tiny_llava_next import KINDS, SIZES, anyres_inputs, row_inputs, tiny_anyres
from tiny_qwen import MODEL_TYPES, qwen_inputs, row, tiny_qwen

ALVTS = ts.ALVTS(ratio=0.2, start_layer=0, rank=8)


@dataclass
class Case:
    """A family's tiny model (built per attention implementation), a two-prompt batch, and its rows."""

    make: Callable[[str], torch.nn.Module]
    batch: dict
    rows: list[dict]

    def __post_init__(self) -> None:
        self.model = self.make("sdpa")


def anyres_case(kind: str) -> Case:
    model = tiny_anyres(kind)
    batch = anyres_inputs(model, [(5, 6), (3, 4)], SIZES)
    return Case(lambda attn: tiny_anyres(kind, attn), batch, [row_inputs(batch, 0), row_inputs(batch, 1)])


def qwen_case(kind: str) -> Case:
    batch = qwen_inputs(kind, [(3, (16, 16), 4), (2, (16, 20), 3)])
    return Case(lambda attn: tiny_qwen(kind, attn), batch, [row(batch, 0), row(batch, 1)])


@pytest.fixture(scope="module", params=KINDS + MODEL_TYPES)
def case(request) -> Case:
    return anyres_case(request.param) if request.param in KINDS else qwen_case(request.param)


def test_keep_all(case):
    check_keep_all(case.model, case.batch, ts.ALVTS(ratio=1.0, rank=4))


def test_cached_equals_held(case):
    with ts.compress(case.model, ALVTS) as handle:
        first = forward_logits(case.model, case.batch).argmax(-1)
        cached = greedy(case.model, case.batch, 4)
        handle.hold_selection()
        held = greedy(case.model, case.batch, 4, use_cache=False)
    assert torch.equal(cached[:, 0], first)
    assert torch.equal(cached, held), (cached, held)


def test_batch_equals_rows(case):
    check_batch_equals_rows(case.model, case.batch, case.rows, ALVTS, steps=3)


def test_sdpa_equals_eager(case):
    check_attention_implementations(case.make, case.batch, ALVTS, steps=3)


@pytest.mark.parametrize("kind", KINDS)
def test_anyres_newlines_are_routed_through_every_layer(kind):
    case = anyres_case(kind)
    with ts.compress(case.model, ALVTS) as handle:
        forward_logits(case.model, case.batch)
    for item, kept in zip(handle.stats.items, handle.stats.kept):
        newlines = item.pinned.nonzero().flatten()
        assert newlines.numel() > 0
        for layer in range(len(case.model.model.language_model.layers)):
            assert set(newlines.tolist()) <= set(kept[f"layer{layer}"].tolist())
