"""The runtime's inner stages on their own: a rule computable by hand, at layer 0 and chained."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from contract import check_batch_equals_rows, check_cache_generation, check_schedule_counts
from test_family_llava import row_inputs
from tiny import llava_inputs, tiny_llava
from tokensieve.runtime.schedule import DecoderStage, Schedule
from tokensieve.ops.plan import selection_plan


def every_other(ctx, requests):
    """Keep the rows at even positions among the item's current rows (first `keep` of them)."""
    return [selection_plan(torch.arange(0, r.positions.numel(), 2)[: r.keep][None]) for r in requests]


@dataclass(frozen=True)
class Halving:
    """Two stages: before layer 0 keep n/2 (every other token), before layer 2 keep n/4 (every other again)."""

    def schedule(self, num_layers, model_type=""):
        stages = (DecoderStage(0, lambda n: n // 2, every_other, name="entry"),
                  DecoderStage(2, lambda n: n // 4, every_other, name="middle"))
        return Schedule(num_layers, lambda n: n, stages=stages)


def test_chained_stages_keep_the_rule_and_meet_the_contract():
    model = tiny_llava()
    batch = llava_inputs(model, [(5, 7), (2, 3)])
    handle = check_schedule_counts(model, batch, Halving(), [144, 144])
    assert handle.stats.tokens_per_layer[0].tolist() == [72, 72, 36, 36]
    kept = handle.stats.kept[0]
    assert torch.equal(kept["entry"], torch.arange(0, 144, 2))
    assert torch.equal(kept["middle"], torch.arange(0, 144, 4))
    check_cache_generation(model, batch, Halving())
    check_batch_equals_rows(model, batch, [row_inputs(batch, 0), row_inputs(batch, 1)], Halving())
