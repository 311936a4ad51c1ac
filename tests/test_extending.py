"""Adding a method is one class; adding a family is one class (docs/architecture.md). Both examples
live here, are registered only for the test, and pass the contract on the runtime as it is."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import CLIPVisionConfig, VipLlavaConfig, VipLlavaForConditionalGeneration

import tokensieve as ts
from contract import (
    check_batch_equals_rows, check_cache_generation, check_cached_equals_held, check_keep_all, check_second_turn,
    forward_logits,
)
from families import FAMILIES, built
from tiny import IMAGE_TOKEN, llava_inputs, row_inputs, tiny_llama_config
from tokensieve import models
from tokensieve.methods.base import check_budget, kept_tokens
from tokensieve.models.llava import LlavaFamily
from tokensieve.ops.plan import selection_plan
from tokensieve.runtime.schedule import DecoderStage, Schedule


# ---------------------------------------------------------------------------------- a new method
@dataclass(frozen=True)
class Strided:
    """Keep evenly spaced visual tokens of each image before decoder layer 0 (reads nothing)."""

    budget: float | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        check_budget(self.budget, self.ratio)

    def schedule(self, num_layers: int, model_type: str = "") -> Schedule:
        def keep(n: int) -> int:
            return kept_tokens(self.budget, self.ratio, n)

        def plan(ctx, requests):
            return [selection_plan(spread(r.positions.numel(), r.keep)[None]) for r in requests]

        return Schedule(num_layers, lambda n: n, stages=(DecoderStage(0, keep, plan, name="strided", vision_side=True),))


def spread(n: int, k: int) -> torch.Tensor:
    """(k,) evenly spaced indices of n."""
    return torch.linspace(0, n - 1, k).round().long()


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_a_new_method_runs_on_the_runtime_as_it_is(family):
    model = built(family)
    case = FAMILIES[family]
    batch = case.batch(model)
    check_keep_all(model, batch, Strided(ratio=1.0))
    with ts.compress(model, Strided(ratio=0.25)) as handle:
        forward_logits(model, batch)
    for item, kept in zip(handle.stats.items, handle.stats.kept):
        chosen = kept["strided"] if "strided" in kept else kept["stage1"]  # Qwen3-VL: on the vision side
        assert torch.equal(chosen, spread(item.keep.numel(), round(0.25 * item.keep.numel())))
    check_cache_generation(model, batch, Strided(ratio=0.25), steps=3)
    check_batch_equals_rows(model, batch, case.rows(batch), Strided(ratio=0.25), steps=3)


# ---------------------------------------------------------------------------------- a new family
class VipLlavaFamily(LlavaFamily):
    """ViP-LLaVA: LLaVA-1.5 whose projector takes several CLIP layers' features, concatenated per patch."""

    model_types = ("vipllava",)

    def nominal_tokens(self, config) -> int:
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def vision_feature_layer(self, model):
        return None  # several layers: no single layer's attention to read


@pytest.fixture(scope="module")
def vipllava():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=48, patch_size=4, projection_dim=32)
    config = VipLlavaConfig(vision_config=vision, text_config=tiny_llama_config(), image_token_id=IMAGE_TOKEN,
                            vision_feature_layers=[-2, -1])
    model = VipLlavaForConditionalGeneration(config).eval()
    registered = models.FAMILIES
    models.FAMILIES = registered + (VipLlavaFamily(),)  # the one line a new family file adds
    try:
        yield model
    finally:
        models.FAMILIES = registered


TINY = {"ApET": dict(ratio=0.25, num_basis=2), "Random": dict(ratio=0.25), "FastV": dict(ratio=0.6)}


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_new_family_passes_the_contract(vipllava, name):
    method, reads_prompt = ts.registry.method(name, **TINY[name]), ts.registry.entry(name).reads_prompt
    batch = llava_inputs(vipllava, [(5, 7), (2, 3)])
    check_keep_all(vipllava, batch, ts.registry.method(name, ratio=1.0))
    if reads_prompt:
        check_cached_equals_held(vipllava, batch, method, steps=3)
    else:
        check_cache_generation(vipllava, batch, method, steps=3)
    check_batch_equals_rows(vipllava, batch, [row_inputs(batch, 0), row_inputs(batch, 1)], method, steps=3)
    check_second_turn(vipllava, batch, method, reads_prompt)
