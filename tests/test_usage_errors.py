"""Mistakes users make with `compress` and `generate`: each is refused up front with an error that
says what to pass instead, and leaves the model untouched."""
from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from contract import _generate, check_second_turn, module_snapshot, next_turn
from families import FAMILIES, built
from tokensieve import registry

APET = ts.ApET(ratio=0.25, num_basis=2)


@pytest.fixture
def llava():
    model = built("llava")
    return model, FAMILIES["llava"].batch(model)


def test_the_method_class_instead_of_an_instance(llava):
    model, _ = llava
    before = module_snapshot(model)
    with pytest.raises(TypeError, match=r"not the class: e.g. tokensieve.ApET\(budget=64\)"):
        ts.compress(model, ts.ApET)
    assert module_snapshot(model) == before


def test_the_inner_model_instead_of_the_generative_one(llava):
    model, _ = llava
    before = module_snapshot(model)
    with pytest.raises(ValueError, match="inner LlavaModel; pass the object from_pretrained returned"):
        ts.compress(model.model, APET)
    assert module_snapshot(model) == before


@pytest.mark.parametrize("option", [dict(num_beams=2), dict(num_return_sequences=2, do_sample=True)])
def test_beam_search_and_several_sequences_are_refused_before_anything_runs(llava, option):
    model, batch = llava
    ran = []
    probe = model.model.vision_tower.register_forward_pre_hook(lambda *_: ran.append(1))
    try:
        with ts.compress(model, APET), pytest.raises(ValueError, match="num_beams=1 and num_return_sequences=1"):
            model.generate(**batch, max_new_tokens=2, **option)
    finally:
        probe.remove()
    assert ran == []


def test_a_second_turn_under_the_old_cache_argument_name(llava):
    """`past_key_values=` (deprecated in transformers 5.24, still accepted) continues the same way as `cache=`."""
    model, batch = llava
    check_second_turn(model, batch, APET, reads_prompt=False, cache_name="past_key_values")


def test_a_second_turn_that_brings_a_new_image_is_refused(llava):
    model, batch = llava
    image_turn = FAMILIES["llava"].batch(model)
    with ts.compress(model, APET):
        first = _generate(model, batch, 2)
        turn = next_turn(batch, first.sequences, image_turn["input_ids"][:, -20:])
        layers = []
        probe = model.model.language_model.register_forward_pre_hook(lambda *_: layers.append(1))
        try:
            with pytest.raises(ValueError, match="brings new images"):
                _generate(model, {**turn, "pixel_values": image_turn["pixel_values"]}, 2, cache=first.past_key_values)
        finally:
            probe.remove()
    assert layers == []


def test_a_cache_from_another_prompt_is_refused(llava):
    model, batch = llava
    other = FAMILIES["llava"].rows(batch)[1]
    with ts.compress(model, APET):
        first = _generate(model, batch, 2)
        _generate(model, other, 2)  # a new prefill: the first cache is no longer this handle's
        turn = next_turn(batch, first.sequences, torch.tensor([[7, 8]]))
        with pytest.raises(RuntimeError, match="cannot be continued under this handle"):
            _generate(model, turn, 2, cache=first.past_key_values)


def test_stats_map_output_rows_to_input_positions(llava):
    """stats.positions names the input position behind each output row: the compressed logits equal
    the uncompressed model's where every earlier row was kept (the text before the image)."""
    model, batch = llava
    reference = model(**batch).logits
    with ts.compress(model, registry.method("Random", ratio=0.25)) as handle, torch.no_grad():
        logits = model(**batch).logits
    positions = handle.stats.positions
    assert positions.shape == logits.shape[:2]
    assert (positions[:, -1] == batch["input_ids"].shape[1] - 1).all()  # the last row is the last prompt token
    row = 0
    first_image = int((batch["input_ids"][row] == 100).nonzero()[0])
    before_image = [i for i, p in enumerate(positions[row].tolist()) if 0 <= p < first_image]
    assert before_image
    torch.testing.assert_close(logits[row, before_image], reference[row, positions[row, before_image]], rtol=1e-5,
                               atol=1e-5)
