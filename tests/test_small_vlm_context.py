"""The second small VLM's training pieces: scene facts, growing the first model, resuming stage A."""
from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest
import torch

from test_small_vlm import HAND, HAND_EXPECTED, HAND_PAIRS
from tokensieve.smallvlm import model as M
from tokensieve.smallvlm import scenes as S
from tokensieve.smallvlm import train_context as C

TINY = M.Sizes(v_hidden=16, v_layers=1, v_heads=2, v_mlp=32, t_hidden=32, t_layers=2, t_heads=2, t_mlp=64)


def test_scene_facts_of_the_hand_scene_match_its_answers():
    facts = dict(zip((name for name, _ in C.FACTS), C.scene_facts(HAND).tolist()))
    assert facts["objects"] == 3
    for color in S.COLOR_NAMES:
        assert facts[f"{color} objects"] == int(HAND_EXPECTED.get(f"how many {color} objects ?", "0"))
    for shape in S.SHAPES:
        assert facts[S.PLURAL[shape]] == int(HAND_EXPECTED[f"how many {S.PLURAL[shape]} ?"])
    for color, shape in C.PAIRS:
        assert facts[f"{color} {shape}"] == int((color, shape) in HAND_PAIRS)
    assert all(0 <= v < n for v, (_, n) in zip(C.scene_facts(HAND), C.FACTS))


def test_grown_model_starts_as_the_first_and_the_check_catches_a_live_new_layer():
    first = M.build_model(TINY, seed=5)
    processor = M.build_processor()
    grown = C.grow(first, replace(TINY, v_layers=2, t_layers=4), seed=1)
    assert len(grown.model.language_model.layers) == 4 and len(grown.model.vision_tower.encoder.layers) == 2
    assert C.check_same_answers(first, grown, processor, n=2) < 1e-5
    with torch.no_grad():
        grown.model.language_model.layers[3].self_attn.o_proj.weight.normal_()
    with pytest.raises(ValueError, match="does not start as the first"):
        C.check_same_answers(first, grown, processor, n=2)


class Interrupted(Exception):
    pass


def test_stage_a_resumed_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    first = M.build_model(TINY, seed=5)
    sizes = replace(TINY, v_layers=2)
    args = argparse.Namespace(seed=1, first_vision_layers=1, steps_a=3, lr_a=2e-3, batch_a=2, facts_weight=1.0,
                              save_every=0.0)
    straight = C.grow(first, sizes, seed=1)
    (tmp_path / "straight").mkdir()
    C.stage_a(straight, args, tmp_path / "straight", None)

    calls, real = [], C.context_batch

    def crash_on_third(seeds):
        calls.append(seeds)
        if len(calls) == 3:
            raise Interrupted
        return real(seeds)

    work = tmp_path / "resumed"
    work.mkdir()
    monkeypatch.setattr(C, "context_batch", crash_on_third)
    with pytest.raises(Interrupted):
        C.stage_a(C.grow(first, sizes, seed=1), args, work, None)
    monkeypatch.setattr(C, "context_batch", real)
    state = C.load_state(work)
    assert (state["stage"], state["step"]) == ("a", 2)
    resumed = C.grow(first, sizes, seed=1)
    resumed.load_state_dict(state["model"])
    C.stage_a(resumed, args, work, state)
    for (name, a), b in zip(straight.model.vision_tower.state_dict().items(), resumed.model.vision_tower.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert straight.model.vision_tower.encoder.layers[1].mlp.fc2.weight.abs().sum() > 0  # the new layer learnt
    torch.testing.assert_close(straight.model.vision_tower.encoder.layers[0].mlp.fc2.weight,
                               first.model.vision_tower.encoder.layers[0].mlp.fc2.weight)  # the first layer is frozen
    assert C.load_state(work)["stage"] == "b"


def partial_batch(tok, share: float, seed: int = 3):
    from tokensieve.smallvlm import train as T

    b = T.qa_batch(tok, [T.item_seed(0, 1, i) for i in range(3)], 3, 576)
    return T, C.partial_views(b, np.random.default_rng(seed), share, 32, 64)


def test_partial_views_hide_tokens_as_if_they_were_removed():
    """The '?' logits with hidden visual tokens equal the decoder's on the sequence with those tokens
    taken out (original positions kept, as the runtime keeps them); hidden patches lose their names
    and the image's questions their evidence target; share 0 changes nothing."""
    model, tok, _ = M.build_all(TINY, seed=1)
    _, plain = partial_batch(tok, 0.0)
    assert (plain["attention_mask"][:, :577] == 1).all() and plain["kept"].tolist() == [576] * 3
    T, b = partial_batch(tok, 1.0)
    image = b["attention_mask"][:, 1:577]
    assert all(32 <= k <= 64 for k in b["kept"].tolist()) and (image.sum(1) == b["kept"]).all()
    assert (b["patch_words"][image == 0] == -1).all() and (b["evidence"] == 0).all()
    lm = model.model.language_model
    seen = {}
    grab = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           pixel_values=b["pixel_values"]).logits
    finally:
        grab.remove()
    for row in range(3):
        visible = torch.nonzero(b["attention_mask"][row]).flatten()
        with torch.no_grad():
            hidden = lm(inputs_embeds=seen["inputs_embeds"][row:row + 1, visible], position_ids=visible[None]).last_hidden_state
            want = model.lm_head(hidden)[0]
        for r, p in b["answer_pos"].tolist():
            if r == row:
                where = int(torch.searchsorted(visible, p))
                torch.testing.assert_close(logits[row, p], want[where], rtol=1e-4, atol=1e-4)


def test_attention_loss_skips_hidden_tokens_like_eager_attention():
    """The words term on partial views against head 0's eager attention probabilities under the same mask."""
    model, tok, _ = M.build_all(TINY, seed=1)
    model.set_attn_implementation("eager")
    T, b = partial_batch(tok, 1.0)
    watch = T.LayerInputs(model.model.language_model.layers, (1,))
    try:
        with torch.no_grad():
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        pixel_values=b["pixel_values"], output_attentions=True)
            got = T.attention_loss(model, watch.seen, (1,), b["answer_pos"], b["words"], b["attention_mask"])
    finally:
        watch.remove()
    probs = out.attentions[1][b["answer_pos"][:, 0], 0, b["answer_pos"][:, 1]]  # (N, T)
    assert (probs[b["attention_mask"][b["answer_pos"][:, 0]] == 0] == 0).all()
    want = -(b["words"] * probs.clamp_min(1e-30).log()).sum(1).mean()
    assert torch.allclose(got, want, rtol=1e-4), (got, want)
