"""The small VLM's scene generator, model/tokenizer/processor round trip and training batches."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from tokensieve.smallvlm import model as M
from tokensieve.smallvlm import scenes as S
from tokensieve.smallvlm import train as T

# A hand-made scene: a small red circle top-left, a large blue square bottom-right,
# a medium red triangle top-right.
HAND = S.Scene([S.Obj("red", "circle", "small", 8, 8),
                S.Obj("blue", "square", "large", 120, 130),
                S.Obj("red", "triangle", "medium", 140, 20)], bg_level=120, noise_seed=1, noise_std=3.0)
HAND_PAIRS = {("red", "circle"), ("blue", "square"), ("red", "triangle")}
HAND_EXPECTED = {
    "what color is the circle ?": "red",
    "what color is the square ?": "blue",
    "what color is the triangle ?": "red",
    "how many red objects ?": "2",
    "how many blue objects ?": "1",
    "how many circles ?": "1",
    "how many squares ?": "1",
    "how many triangles ?": "1",
    "where is the red circle ?": "topleft",
    "where is the blue square ?": "bottomright",
    "where is the red triangle ?": "topright",
    "what color is the smallest object ?": "red",
    "what shape is the smallest object ?": "circle",
}


def test_generator_is_deterministic():
    a, b = S.make_sample(12345), S.make_sample(12345)
    assert (a.question, a.answer, a.kind) == (b.question, b.answer, b.kind)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.labels, b.labels)
    c = S.make_sample(12346)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


@pytest.mark.parametrize("kind", S.KINDS)
def test_answers_on_a_hand_checked_scene(kind):
    seen = set()
    for seed in range(60):
        question = S.ask(HAND, kind, np.random.default_rng(seed))
        q, a = question.text, question.answer
        seen.add(q)
        if q in HAND_EXPECTED:
            assert a == HAND_EXPECTED[q], q
        elif q.startswith("how many"):  # a colour that is absent
            assert a == "0", q
        else:
            assert q.startswith("is there a "), q
            color, shape = q.split()[3:5]
            assert a == ("yes" if (color, shape) in HAND_PAIRS else "no"), q
    assert len(seen) >= 2


def test_adversarial_negatives_exist():
    """Some 'no' answers name a colour and a shape that are both in the scene, just not together."""
    qs = [(x.text, x.answer) for x in (S.ask(HAND, "exists", np.random.default_rng(s)) for s in range(200))]
    no = [q for q, a in qs if a == "no"]
    adversarial = [q for q in no if q.split()[3:5] == ["blue", "circle"] or q.split()[3:5] == ["red", "square"]
                   or q.split()[3:5] == ["blue", "triangle"]]
    assert 60 < len(no) < 140 and len(adversarial) > 20


def owned_by_loop(mask: np.ndarray, index: int) -> set[int]:
    """Flat indices of the patches where object `index` covers at least 16 of the 64 pixels (slow loop)."""
    out = set()
    for r in range(24):
        for c in range(24):
            if (mask[8 * r:8 * r + 8, 8 * c:8 * c + 8] == index + 1).sum() >= 16:
                out.add(24 * r + c)
    return out


def test_patch_labels_of_the_hand_scene():
    img, mask = S.render(HAND)
    lab = S.patch_labels(HAND, mask)
    assert lab.shape == (6, 24, 24) and img.size == (192, 192)
    color, shape, quadrant, size, anchor, owner = (row.reshape(-1) for row in lab)
    for i, o in enumerate(HAND.objects):
        patches = sorted(owned_by_loop(mask, i))
        assert set(np.flatnonzero(owner == i).tolist()) == set(patches)
        assert (color[patches] == 1 + S.COLOR_NAMES.index(o.color)).all()
        assert (shape[patches] == 1 + S.SHAPES.index(o.shape)).all()
        assert (size[patches] == S.SIZE_NAMES.index(o.size)).all()
        assert (quadrant[patches] == o.quadrant).all()
        centre = int(o.y + o.px / 2) // 8 * 24 + int(o.x + o.px / 2) // 8
        assert anchor[centre] == 1
    assert owner[24 + 1] == 0 and quadrant[24 + 1] == 0  # the small circle: 12 px at (8, 8) covers patch (1, 1)
    assert anchor.sum() == 3 and color[0] == 0 and quadrant[0] == -1 and owner[0] == -1
    r, g, b = img.getpixel((132, 142))  # centre of the large blue square (24 px at (120, 130))
    assert b > 180 and r < 100


def owned_patches(question_text: str) -> set[int]:
    """Flat patch indices of the hand-scene objects a question names, from the pixels' owners."""
    img, mask = S.render(HAND)
    owner = S.patch_labels(HAND, mask)[5].reshape(-1)
    named = [i for i, o in enumerate(HAND.objects) if f"{o.color} {o.shape}" in question_text
             or f"the {o.shape} ?" in question_text]
    return {int(p) for p in np.flatnonzero(np.isin(owner, named))}


def test_evidence_points_at_the_objects_asked_about():
    img, mask = S.render(HAND)
    labels = S.patch_labels(HAND, mask)
    for seed in range(80):
        for kind in S.KINDS:
            q = S.ask(HAND, kind, np.random.default_rng(seed))
            patches = set(S.evidence_patches(HAND, labels, q).tolist())
            if kind == "count":  # the centre patch of each matching object
                word = q.text.split()[2]
                match = [o for o in HAND.objects if o.color == word or S.PLURAL[o.shape] == word]
                assert patches == {int(o.y + o.px / 2) // 8 * 24 + int(o.x + o.px / 2) // 8 for o in match}, q
                assert q.answer == str(len(patches))
            elif q.answer == "no":
                assert patches == set(), q
            elif kind == "small":
                assert patches == owned_by_loop(mask, 0), q
            else:
                assert patches and patches == owned_patches(q.text), q


def test_kinds_balanced_and_answers_spread():
    samples = S.split_samples("val", 200)
    kinds = collections.Counter(s.kind for s in samples)
    assert set(kinds.values()) == {40}
    yes = sum(s.answer == "yes" for s in samples if s.kind == "exists")
    assert 12 <= yes <= 28
    for s in samples:  # one small object, distinct pairs
        assert sum(o.size == "small" for o in s.scene.objects) == 1
        assert len({(o.color, o.shape) for o in s.scene.objects}) == len(s.scene.objects)
        assert 2 <= len(s.scene.objects) <= 6


def test_splits_disjoint():
    spans = sorted(S.SPLITS.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert S.split_seed("val", 0) != S.split_seed("test", 0)
    for run_seed in (0, 1, 9):
        for stage in (0, 1):
            assert S.SPLITS["train"][0] <= T.item_seed(run_seed, stage, 10**6) < S.SPLITS["train"][1]


TINY = M.Sizes(v_hidden=16, v_layers=1, v_heads=2, v_mlp=32, t_hidden=16, t_layers=2, t_heads=2, t_mlp=32)


def test_processor_gives_576_placeholders_and_fast_pixels():
    proc = M.build_processor()
    s = [S.make_sample(i) for i in range(2)]
    batch = proc(images=[x.image for x in s], text=[M.prompt(x.question) for x in s], return_tensors="pt", padding=True)
    image_id = proc.tokenizer.convert_tokens_to_ids(M.IMAGE_TOKEN)
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [576, 576]
    assert proc.tokenizer.unk_token_id not in batch["input_ids"]
    assert torch.allclose(batch["pixel_values"], M.pixels([x.image for x in s]), atol=1e-5)


def test_model_processor_round_trip(tmp_path):
    model, tok, proc = M.build_all(TINY, seed=3)
    model.eval()
    s = [S.make_sample(i) for i in range(3)]
    batch = proc(images=[x.image for x in s], text=[M.prompt(x.question) for x in s], return_tensors="pt", padding=True)
    M.save(model, proc, str(tmp_path))
    loaded, proc2 = M.load(str(tmp_path))
    assert next(model.parameters()).dtype == torch.float32
    batch2 = proc2(images=[x.image for x in s], text=[M.prompt(x.question) for x in s], return_tensors="pt", padding=True)
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    assert torch.equal(batch["pixel_values"], batch2["pixel_values"])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # what the fp16 checkpoint holds
        want = model(**batch).logits
        got = loaded(**batch2).logits
    assert torch.allclose(want, got, atol=1e-4)
    assert len(M.answer(loaded, proc2, [x.image for x in s], [x.question for x in s])) == 3


def test_training_batch_marks_answers():
    tok = M.build_tokenizer()
    b = T.qa_batch(tok, [T.item_seed(0, 1, i) for i in range(3)], 4, 576)
    qmark = tok.convert_tokens_to_ids("?")
    rows, pos = b["answer_pos"][:, 0], b["answer_pos"][:, 1]
    assert (b["input_ids"][rows, pos] == qmark).all()
    assert torch.equal(b["input_ids"][rows, pos + 1], b["answer_ids"])
    assert (b["input_ids"][:, 0] == tok.bos_token_id).all()
    image_id = tok.convert_tokens_to_ids(M.IMAGE_TOKEN)
    assert (b["input_ids"][:, 1:577] == image_id).all()
    assert len(b["answer_ids"]) == 12
    target = b["evidence"]
    assert torch.allclose(target.sum(1), torch.ones(12))
    after = torch.arange(target.shape[1])[None] > pos[:, None]
    assert (target[after] == 0).all()
    assert (target[:, 1:577] > 0).any(1).sum() >= 6  # most questions point at visual tokens
    words = b["words"]
    assert torch.allclose(words.sum(1), torch.ones(12))
    for n, (r, p) in enumerate(zip(rows.tolist(), pos.tolist())):
        span = torch.nonzero(words[n]).flatten()
        assert span.max() == p - 1 and b["input_ids"][r, span.min() - 1] in (image_id, b["answer_ids"][n - 1])


def test_evidence_loss_equals_cross_entropy_with_eager_attention():
    """The evidence term against head 0's attention probabilities returned by eager attention."""
    model, tok, proc = M.build_all(TINY, seed=1)
    model.set_attn_implementation("eager")
    b = T.qa_batch(tok, [T.item_seed(0, 1, i) for i in range(2)], 3, 576)
    layers = model.model.language_model.layers
    watch = T.LayerInputs(layers, (1,))
    try:
        with torch.no_grad():
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        pixel_values=b["pixel_values"], output_attentions=True)
            got = T.attention_loss(model, watch.seen, (1,), b["answer_pos"], b["evidence"])
    finally:
        watch.remove()
    assert not layers[1]._forward_pre_hooks
    probs = out.attentions[1][b["answer_pos"][:, 0], 0, b["answer_pos"][:, 1]]  # (N, T)
    want = -(b["evidence"] * probs.clamp_min(1e-30).log()).sum(1).mean()
    assert torch.allclose(got, want, rtol=1e-4), (got, want)


def test_kind_weights_steer_the_training_questions():
    uniform = [q.kind for s in range(40) for q in S.training_item(s, 5)[1]]
    counts = [q.kind for s in range(40) for q in S.training_item(s, 5, {"count": 3, "color": 1})[1]]
    assert set(uniform) == set(S.KINDS)
    assert set(counts) == {"count", "color"} and counts.count("count") > 2 * counts.count("color")
    assert T.kind_weights("count=3, color=1") == {"count": 3.0, "color": 1.0}
    for bad in ("count", "counting=2", "count=x"):
        with pytest.raises(Exception, match="kind"):
            T.kind_weights(bad)
    with pytest.raises(ValueError, match="positive total"):
        S.training_item(0, 3, {"count": 0.0})
