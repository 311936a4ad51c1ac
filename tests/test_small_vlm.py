"""The small VLM's scene generator, model/tokenizer/processor round trip and training batches."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from bench.vlm import model as M
from bench.vlm import scenes as S
from bench.vlm import train as T

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
        q, a = S.ask(HAND, kind, np.random.default_rng(seed))
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
    qs = [S.ask(HAND, "exists", np.random.default_rng(s)) for s in range(200)]
    no = [q for q, a in qs if a == "no"]
    adversarial = [q for q in no if q.split()[3:5] == ["blue", "circle"] or q.split()[3:5] == ["red", "square"]
                   or q.split()[3:5] == ["blue", "triangle"]]
    assert 60 < len(no) < 140 and len(adversarial) > 20


def test_patch_labels_of_the_hand_scene():
    img, mask = S.render(HAND)
    lab = S.patch_labels(HAND, mask)
    assert lab.shape == (4, 24, 24) and img.size == (192, 192)
    red_circle = 1 + S.COLOR_NAMES.index("red") * 3 + S.SHAPES.index("circle")
    assert (lab[0, 1:3, 1:3] == red_circle).all()  # small: 16 px at (8, 8) = patches 1-2
    assert (lab[1, 1:3, 1:3] == 0).all() and (lab[2, 1:3, 1:3] == 0).all()
    assert lab[3, 2, 2] == 1 and lab[3].sum() == 3
    assert lab[0, 0, 0] == 0 and lab[1, 0, 0] == -1
    r, g, b = img.getpixel((140, 150))  # centre of the blue square
    assert b > 180 and r < 100


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
    assert (b["input_ids"][:, :576] == tok.convert_tokens_to_ids(M.IMAGE_TOKEN)).all()
    assert len(b["answer_ids"]) == 12
