"""ALVTS on a tiny LLaVA-1.5: routing against a slow by-hand reference, selectors, calibration."""
from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from contract import (
    check_attention_implementations,
    check_batch_equals_rows,
    check_keep_all,
    check_removal,
    check_schedule_counts,
    forward_logits,
    greedy,
)
from tiny import IMAGE_TOKEN, llava_inputs, row_inputs, tiny_llava
from tokensieve.calibrate import collect_layer_inputs, layer_fidelity
from tokensieve.methods.alvts import layer_counts
from tokensieve.selectors import layer_scores, svd_selectors

N = 144
ALVTS_64 = ts.ALVTS(ratio=64 / 576, start_layer=0, rank=8)  # 16 of 144 per layer


def reference_routing_logits(model, inputs: dict, selectors, k: int, v2v_rows: str = "all") -> torch.Tensor:
    """One unpadded prompt, routed by hand: before each layer, score with the selector, gather text +
    the top-k visual rows, call the layer with a causal mask over them, scatter its output back."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
        embeds = lm.embed_tokens(ids)
        visual = ids == IMAGE_TOKEN
        embeds[visual] = features
        hidden = embeds
        positions = torch.arange(ids.shape[1])[None]
        rotary = lm.rotary_emb(hidden, positions)
        item = torch.where(visual, 0, -1)
        valid = torch.ones_like(visual)
        for index, layer in enumerate(lm.layers):
            scores = layer_scores(layer, hidden, rotary, item, valid, selectors.layers[index], v2v_rows=v2v_rows)[0]
            visual_rows = visual[0].nonzero().flatten()
            top = visual_rows[scores[visual_rows].argsort(descending=True, stable=True)[:k]]
            rows = torch.cat([(~visual[0]).nonzero().flatten(), top]).sort().values
            sub = hidden[:, rows]
            causal = torch.ones(len(rows), len(rows), dtype=torch.bool).tril()[None, None]
            out = layer(sub, attention_mask=causal, position_embeddings=tuple(t[:, rows] for t in rotary),
                        position_ids=positions[:, rows])
            hidden = hidden.clone()
            hidden[:, rows] = out
        return model.lm_head(lm.norm(hidden))[:, -1].float()


@pytest.mark.parametrize("v2v_rows", ["all", "attending"])
def test_routing_equals_by_hand_reference(model, batch, v2v_rows):
    row = row_inputs(batch, 0)
    selectors = svd_selectors("llava", model.model.language_model.layers, rank=8)
    with ts.compress(model, ts.ALVTS(ratio=64 / 576, start_layer=0, selectors=selectors, v2v_rows=v2v_rows)) as handle:
        compressed = forward_logits(model, row)
    expected = reference_routing_logits(model, row, selectors, k=16, v2v_rows=v2v_rows)
    torch.testing.assert_close(compressed, expected, rtol=1e-4, atol=1e-4)
    assert handle.stats.tokens_per_layer[0].tolist() == [16, 16, 16, 16]


def test_keep_all_is_identical(model, batch):
    check_keep_all(model, batch, ts.ALVTS(ratio=1.0, rank=4))


def test_removal_restores_model(model, batch):
    check_removal(model, batch, ALVTS_64, lambda m: ["model.language_model.layers.0", "model.language_model.layers.3"])


def test_cached_generation_equals_held_recomputation(model, batch):
    """The cache holds each layer's prefill choice; recomputing without a cache with that choice held
    gives the same tokens, and the first token is the compressed forward's argmax."""
    with ts.compress(model, ALVTS_64) as handle:
        first = forward_logits(model, batch).argmax(-1)
        cached = greedy(model, batch, 5)
        handle.hold_selection()
        uncached = greedy(model, batch, 5, use_cache=False)
    assert torch.equal(cached[:, 0], first)
    assert torch.equal(cached, uncached)


def test_cache_shrinks_per_layer(model, batch):
    with ts.compress(model, ALVTS_64), torch.no_grad():
        out = model(**batch, use_cache=True)
    text = int((batch["attention_mask"][0] == 1).sum()) - N
    length = batch["input_ids"].shape[1] - N + 16  # row 0 (longest) keeps 16 visual rows per layer
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [length] * 4 and text > 0


def test_batch_equals_each_row(model, batch):
    check_batch_equals_rows(model, batch, [row_inputs(batch, 0), row_inputs(batch, 1)], ALVTS_64)


def test_schedule_counts(model, batch):
    method = ts.ALVTS(ratio=0.3, start_layer=1, rank=4)
    handle = check_schedule_counts(model, batch, method, [N, N])
    counts = handle.stats.tokens_per_layer[0].tolist()
    assert counts[0] == N and sum(counts) == round(0.3 * N * 4)
    assert set(handle.stats.kept[0]) == {"stage1", "layer1", "layer2", "layer3"}


@pytest.mark.parametrize("n,mean,layers,start", [(576, 64, 32, 1), (576, 192, 32, 2), (144, 16, 4, 0), (100, 37.5, 7, 1)])
def test_layer_counts_mean_equals_budget(n, mean, layers, start):
    counts = layer_counts(n, mean, layers, start)
    assert len(counts) == layers and counts[:start] == [n] * start
    assert sum(counts) == round(mean * layers) and max(counts[start:]) - min(counts[start:]) <= 1


def test_unknown_v2v_rows_is_refused():
    with pytest.raises(ValueError, match="v2v_rows must be one of 'all', 'attending'"):
        ts.ALVTS(budget=64, v2v_rows="causal")


def test_too_small_budget_is_a_clear_error(model):
    with pytest.raises(ValueError, match="lower start_layer or raise the budget"):
        ts.compress(model, ts.ALVTS(ratio=64 / 576, start_layer=1))


def test_sdpa_and_eager_agree(batch):
    check_attention_implementations(tiny_llava, batch, ALVTS_64)


def test_full_rank_svd_reproduces_the_oracle(model, batch):
    layers = model.model.language_model.layers
    full = svd_selectors("llava", layers, rank=layers[0].self_attn.q_proj.weight.shape[0])
    inputs = collect_layer_inputs(model, [batch])
    for index, layer in enumerate(layers):
        b = inputs[index][0]
        oracle = layer_scores(layer, b.hidden, b.rotary, b.item, b.valid)
        approx = layer_scores(layer, b.hidden, b.rotary, b.item, b.valid, full.layers[index])
        torch.testing.assert_close(approx, oracle, rtol=1e-3, atol=1e-9)
        assert oracle[b.item >= 0].std() > 0  # the scores are not constant


def structured_inputs(model, seed: int) -> dict:
    """Images mixed from a few fixed prototypes plus a little noise, and prompts from a fixed template:
    the held-out samples share the training samples' structure, as real calibration data would."""
    prototypes = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(seed)
    inputs = llava_inputs(model, [(4, 6), (4, 6)], seed=0)  # same text every time
    weights = torch.rand(2, 3, generator=generator)
    inputs["pixel_values"] = torch.einsum("bk,kchw->bchw", weights, prototypes) + 0.1 * torch.randn(
        2, 3, 32, 32, generator=generator)
    return inputs


def sharpened(model):
    """Larger q/k weights so attention depends on content (a random init attends almost uniformly)."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return model


def test_calibration_lowers_heldout_score_mse(tmp_path):
    model = sharpened(tiny_llava("sdpa", image_size=32))
    train = [structured_inputs(model, seed) for seed in range(8)]
    heldout = [structured_inputs(model, 1000 + seed) for seed in range(3)]
    fitted = ts.calibrate_alvts(model, train, rank=2, steps=60, lr=1e-2, start_layer=1, progress=False)
    layers = model.model.language_model.layers
    initial = svd_selectors("llava", layers, rank=2, start_layer=1)
    inputs = collect_layer_inputs(model, heldout)
    before = [layer_fidelity(layers[i], initial.layers[i], inputs[i], lambda n: 8)["score_mse"] for i in range(1, 4)]
    after = [layer_fidelity(layers[i], fitted.layers[i], inputs[i], lambda n: 8)["score_mse"] for i in range(1, 4)]
    assert sum(after) < 0.8 * sum(before), (before, after)
    for i in range(1, 4):
        assert fitted.fidelity[i]["after"]["score_mse"] < fitted.fidelity[i]["before"]["score_mse"]

    path = tmp_path / "selectors.safetensors"
    fitted.save(path)
    loaded = ts.Selectors.load(path)
    assert loaded.identity == fitted.identity and loaded.fidelity == fitted.fidelity
    for a, b in zip(fitted.layers[1:], loaded.layers[1:]):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    sample = heldout[0]
    with ts.compress(model, ts.ALVTS(ratio=0.5, selectors=fitted, start_layer=1)):
        from_object = forward_logits(model, sample)
    with ts.compress(model, ts.ALVTS(ratio=0.5, selectors=str(path), start_layer=1)):
        from_file = forward_logits(model, sample)
    assert torch.equal(from_object, from_file)

    other = tiny_llava("sdpa", seed=1, image_size=32)
    with pytest.raises(ts.SelectorMismatchError, match="fingerprint"):
        ts.compress(other, ts.ALVTS(ratio=0.5, selectors=str(path), start_layer=1))


def test_calibration_never_leaves_a_selector_worse_than_its_svd_start():
    """With a learning rate far too high every Adam step overshoots; the SVD start is kept instead."""
    model = sharpened(tiny_llava("sdpa", image_size=32))
    train = [structured_inputs(model, seed) for seed in range(4)]
    fitted = ts.calibrate_alvts(model, train, rank=2, steps=12, lr=50.0, start_layer=1, progress=False)
    initial = svd_selectors("llava", model.model.language_model.layers, rank=2, start_layer=1)
    for i in range(1, 4):
        entry = fitted.fidelity[i]
        assert entry["after"]["score_mse"] <= entry["before"]["score_mse"], (i, entry)
    kept_start = [all(torch.equal(x, y) for x, y in zip(fitted.layers[i].parameters(), initial.layers[i].parameters()))
                  for i in range(1, 4)]
    assert any(kept_start)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_selector_scores_in_that_precision_and_agrees_with_float32(model, batch, dtype):
    """A half-precision layer's selector projects and multiplies in that precision (as the layer
    does) and still ranks the visual tokens as the float32 computation of the same inputs does."""
    import copy

    from tokensieve.attention import queries_keys

    half = copy.deepcopy(model).to(dtype)
    layers = half.model.language_model.layers
    selector = svd_selectors("llava", layers, 8).layers[1]
    b = collect_layer_inputs(model, [batch])[1][0]
    hidden, rotary = b.hidden.to(dtype), tuple(t.to(dtype) for t in b.rotary)
    q, k = queries_keys(layers[1], hidden, rotary, low_rank=(selector.query, selector.key), dtype=dtype)
    assert q.dtype == k.dtype == dtype
    got = layer_scores(layers[1], hidden, rotary, b.item, b.valid, selector)
    float32 = copy.deepcopy(layers[1]).float()
    want = layer_scores(float32, hidden.float(), tuple(t.float() for t in rotary), b.item, b.valid, selector)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    visual = b.item >= 0
    assert (got[visual] - want[visual]).abs().sum() / want[visual].abs().sum() < 0.05
    for row in range(visual.shape[0]):
        top = lambda s: set(s[row][visual[row]].topk(16).indices.tolist())
        assert len(top(got) & top(want)) >= 12
