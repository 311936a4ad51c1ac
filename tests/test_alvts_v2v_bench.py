"""The ALVTS V2V study's reading of the uncompressed model's attention, on a tiny saved small VLM."""
from __future__ import annotations

import numpy as np
import pytest

from tokensieve.bench import alvts_v2v as V
from tokensieve.bench.accuracy import prepare
from tokensieve.smallvlm import model as M
from tokensieve.smallvlm import scenes as S

TINY = M.Sizes(v_hidden=16, v_layers=1, v_heads=2, v_mlp=32, t_hidden=32, t_layers=3, t_heads=2, t_mlp=64)


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    path = tmp_path_factory.mktemp("small_vlm")
    model, _, processor = M.build_all(TINY, seed=3)
    M.save(model, processor, str(path))
    return M.load(str(path), attn_implementation="eager")


def test_answer_attention_of_a_padded_batch_equals_each_question_alone(eager):
    model, processor = eager
    samples = S.split_samples("test", 6)
    assert len({len(processor.tokenizer(M.prompt(s.question)).input_ids) for s in samples}) > 1  # padding happens
    evidence = V.evidence_masks(samples)
    batched = V.answer_attention(model, prepare(processor, samples, 3), evidence)  # two batches
    alone = [V.answer_attention(model, prepare(processor, [s], 1), evidence[n:n + 1]) for n, s in enumerate(samples)]
    for field in ("image", "evidence", "first_rows"):
        expected = np.mean([getattr(r, field) for r in alone], 0)
        np.testing.assert_allclose(getattr(batched, field), expected, atol=1e-5)
    assert batched.image.shape == (TINY.t_layers,)
    assert np.all(batched.evidence <= batched.image + 1e-6) and np.all(batched.image <= 1 + 1e-6)
    assert np.all(batched.first_rows <= batched.image + 1e-6)
