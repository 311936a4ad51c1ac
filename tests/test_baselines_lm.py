"""Random, DivPrune, FastV and PyramidDrop against the test contract and their own definitions.

On a tiny LLaVA-1.5 (144 tokens, 4 layers): keep-all identity, removal, cached generation, batch =
rows, per-layer counts, SDPA = eager; each method's kept tokens against an independent reference
(the eager model's own attention weights for FastV and PDrop, a slow max-min loop for DivPrune,
seeded draws for Random). Then each method once on a tiny Qwen2.5-VL and a tiny LLaVA-NeXT.
"""
from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from contract import (
    check_attention_implementations,
    check_batch_equals_rows,
    check_cache_generation,
    check_cached_equals_held,
    check_keep_all,
    check_removal,
    check_schedule_counts,
    forward_logits,
    module_snapshot,
)
from test_family_llava import row_inputs
from tiny import IMAGE_TOKEN, tiny_llava
from tiny_llava_next import SIZES, anyres_inputs, tiny_anyres
from tiny_llava_next import row_inputs as anyres_row
from tiny_qwen import qwen_inputs, tiny_qwen
from tiny_qwen import row as qwen_row
from tokensieve.attention import last_query_attention_flops
from tokensieve.ops.divprune import divprune_select

N = 144
# tiny LLaVA (144 tokens, 4 layers): each method's counts per layer, written out by hand
METHODS = {
    "random": (ts.Random(ratio=64 / 576), [16, 16, 16, 16]),  # 16 kept before layer 0
    "divprune": (ts.DivPrune(ratio=64 / 576), [16, 16, 16, 16]),
    # mean 0.55 * 144 = 79.2: layers 0-1 see 144, then round((79.2 * 4 - 288) / 2) = 14
    "fastv": (ts.FastV(ratio=0.55), [144, 144, 14, 14]),
    # mean 0.3 * 144 = 43.2: drops before layers 1/2/3 keep 16/8 then 5 (the last absorbs the rounding)
    "pdrop": (ts.PDrop(ratio=0.3), [144, 16, 8, 5]),
}
READS_PROMPT = {"fastv", "pdrop"}


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava("eager")


def rows_of(batch: dict) -> list[dict]:
    return [row_inputs(batch, 0), row_inputs(batch, 1)]


def check_generation(model, inputs: dict, name: str, method) -> None:
    if name in READS_PROMPT:
        check_cached_equals_held(model, inputs, method)
    else:
        check_cache_generation(model, inputs, method, steps=4)


# ---------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("cls", [ts.Random, ts.DivPrune, ts.FastV, ts.PDrop])
def test_keep_all_is_identical(model, batch, cls):
    check_keep_all(model, batch, cls(ratio=1.0))


@pytest.mark.parametrize("name", METHODS)
def test_removal_restores_model(model, batch, name):
    method, _ = METHODS[name]
    stage_layers = [stage.layer for stage in method.schedule(4).stages]

    def hooked(model):
        return ["model", "model.language_model", "model.multi_modal_projector"] + [
            f"model.language_model.layers.{layer}" for layer in stage_layers]

    check_removal(model, batch, method, hooked)


@pytest.mark.parametrize("name", METHODS)
def test_cached_generation(model, batch, name):
    check_generation(model, batch, name, METHODS[name][0])


@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_each_row(model, batch, name):
    check_batch_equals_rows(model, batch, rows_of(batch), METHODS[name][0])


@pytest.mark.parametrize("name", METHODS)
def test_tokens_per_layer_follow_schedule(model, batch, name):
    method, per_layer = METHODS[name]
    handle = check_schedule_counts(model, batch, method, [N, N])
    assert handle.stats.tokens_per_layer.tolist() == [per_layer, per_layer]
    for kept in handle.stats.kept:
        for stage in handle.schedule.stages:
            assert kept[stage.name].numel() == per_layer[stage.layer]


@pytest.mark.parametrize("name", sorted(READS_PROMPT))
def test_attention_reading_stages_count_their_flops(model, batch, name):
    """Each stage reads the last token's attention over every image's rows: counted per image, on the
    rows the stage reduces (per_layer[layer - 1]), so the selection's share is not reported as zero."""
    method, per_layer = METHODS[name]
    with ts.compress(model, method) as handle, torch.no_grad():
        model(**batch)
    width = model.config.text_config.hidden_size
    expected = sum(2 * last_query_attention_flops(per_layer[stage.layer - 1], per_layer[stage.layer], width)
                   for stage in handle.schedule.stages)
    assert handle.stats.selection_flops == expected > 0


@pytest.mark.parametrize("name", METHODS)
def test_sdpa_and_eager_agree(batch, name):
    check_attention_implementations(tiny_llava, batch, METHODS[name][0])


# ---------------------------------------------------------------------------------- budgets
def mean_of(method, n=576, layers=32) -> float:
    counts = method.schedule(layers).tokens_per_layer(n)
    return sum(counts) / layers


def test_llava_7b_schedules_match_docstrings():
    """32 layers, 576 tokens: the numbers the docstrings give."""
    for budget, kept, mean in [(192, 166, 191.625), (128, 98, 127.875), (64, 30, 64.125)]:
        schedule = ts.FastV(budget=budget).schedule(32)
        assert schedule.tokens_per_layer(576) == [576, 576] + [kept] * 30
        assert mean_of(ts.FastV(budget=budget)) == mean
    assert mean_of(ts.FastV(kept=64)) == 96  # the paper's "64"
    for budget, counts in [(192, [285, 143, 71]), (128, [168, 84, 42]), (64, [51, 26, 13])]:
        schedule = ts.PDrop(budget=budget).schedule(32)
        assert [stage.layer for stage in schedule.stages] == [2, 12, 22]
        assert [stage.name for stage in schedule.stages] == ["drop1", "drop2", "drop3"]
        assert schedule.tokens_per_layer(576) == [576] * 2 + [counts[0]] * 10 + [counts[1]] * 10 + [counts[2]] * 10
        assert abs(mean_of(ts.PDrop(budget=budget)) - budget) < 0.2
    authors = [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert ts.PDrop(layers=(8, 16, 24)).schedule(32).tokens_per_layer(576) == authors
    assert ts.PDrop(budget=270).schedule(32).tokens_per_layer(576) == authors  # the authors' mean
    for cls in (ts.Random, ts.DivPrune):
        assert cls(budget=64).schedule(32).tokens_per_layer(576) == [64] * 32


@pytest.mark.parametrize("n,layers", [(576, 32), (2880, 32), (144, 4), (300, 28)])
@pytest.mark.parametrize("fraction", [0.05, 0.111, 0.2, 0.33, 0.5, 0.8])
def test_realised_mean_is_nearest(n, layers, fraction):
    """FastV's mean is within half a step of R; PDrop's within half a step of its last stage."""
    budget = fraction * n
    for method, step in [(ts.FastV(budget=budget), (layers - 2) / layers), (ts.PDrop(budget=budget, reference_tokens=n), None)]:
        try:
            schedule = method.schedule(layers)
            schedule.check_item(n)  # what compress checks for the model's nominal image
            counts = schedule.tokens_per_layer(n)
        except ValueError as error:
            assert "cannot reach" in str(error)
            assert fraction * layers < 3  # only budgets below the full first layers' share
            continue
        last = layers - schedule.stages[-1].layer
        step = step if step is not None else last / layers
        assert abs(sum(counts) / layers - budget) <= step / 2 + 1e-9, (method, counts)
        assert counts == sorted(counts, reverse=True)


def test_impossible_budgets_fail_before_the_model_is_touched(model):
    before = module_snapshot(model)
    with pytest.raises(ValueError, match="raise the budget, lower layer"):
        ts.compress(model, ts.FastV(budget=30))  # layers 0-1 already spend a mean of 72.5
    with pytest.raises(ValueError, match="cannot reach ratio"):
        ts.compress(model, ts.FastV(ratio=0.4))
    with pytest.raises(ValueError, match="earlier first drop"):
        ts.compress(model, ts.PDrop(budget=20))  # the first drop before layer 1: a mean of at least 36.75
    with pytest.raises(ValueError, match="layer must be in"):
        ts.compress(model, ts.FastV(kept=8, layer=4))
    with pytest.raises(ValueError, match="layers must be below 4"):
        ts.compress(model, ts.PDrop(budget=40, layers=(1, 4)))
    assert module_snapshot(model) == before


@pytest.mark.parametrize("make,message", [
    (lambda: ts.Random(), "needs a budget"),
    (lambda: ts.Random(budget=8, seed=-1), "seed"),
    (lambda: ts.DivPrune(budget=8, ratio=0.1), "not both"),
    (lambda: ts.FastV(), "exactly one"),
    (lambda: ts.FastV(budget=64, kept=64), "exactly one"),
    (lambda: ts.FastV(kept=0), "at least 1"),
    (lambda: ts.FastV(kept=8, layer=0), "layer must be at least 1"),
    (lambda: ts.PDrop(), "needs a budget"),
    (lambda: ts.PDrop(budget=64, lambda_=1.0), "lambda_"),
    (lambda: ts.PDrop(layers=(8, 8)), "strictly increasing"),
    (lambda: ts.PDrop(ratio=2.0), "ratio must be"),
])
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------------------------- definitions
def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, N, D) projected image features from the unwrapped model."""
    with torch.no_grad():
        return torch.stack(list(model.model.get_image_features(pixel_values).pooler_output))


def slow_divprune(x: torch.Tensor, keep: int) -> list[int]:
    """Max-min diversity, spelled out: distances pair by pair, then the greedy loop over Python lists."""
    n = x.shape[0]
    dist = [[1.0 - float(torch.dot(x[i], x[j]) / (x[i].norm() * x[j].norm())) for j in range(n)] for i in range(n)]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < keep:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(dist[s][j] for s in chosen), -j)))
    return sorted(chosen)


def test_divprune_operator_by_hand():
    """Unit vectors at 0, 0, 90 and 180 degrees: nearest-neighbour distances 0, 0, 1, 1, so the first
    pick is token 2 (the first of the tie); then tokens 0, 1, 3 are all at distance 1: token 0; then
    token 3 (distance 1) beats token 1 (a duplicate of 0, distance 0)."""
    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]])
    assert divprune_select(x, 1).tolist() == [[2]]
    assert divprune_select(x, 2).tolist() == [[0, 2]]
    assert divprune_select(x, 3).tolist() == [[0, 2, 3]]
    assert divprune_select(x.repeat(2, 1, 1), 4).tolist() == [[0, 1, 2, 3]] * 2


def test_divprune_keeps_the_max_min_subset(model, batch):
    method = ts.DivPrune(ratio=64 / 576)
    features = image_features(model, batch["pixel_values"])
    with ts.compress(model, method) as handle:
        forward_logits(model, batch)
    for i in range(2):
        assert handle.stats.kept[i]["divprune"].tolist() == slow_divprune(features[i], 16)


def test_random_is_seeded_and_position_independent(model, batch):
    method = ts.Random(ratio=64 / 576, seed=3)
    kept = []
    for inputs in [batch, rows_of(batch)[1], batch]:
        with ts.compress(model, method) as handle:
            forward_logits(model, inputs)
        kept += [record["random"] for record in handle.stats.kept]
    assert all(torch.equal(k, kept[0]) for k in kept)  # same size, same subset, wherever it sits
    assert kept[0].numel() == 16 and not torch.equal(kept[0], torch.arange(16))
    assert not torch.equal(ts.Random(ratio=64 / 576, seed=4).subset(N, 16), kept[0])
    assert not torch.equal(method.subset(N + 1, 16), kept[0])  # the image's size enters the seed
    seen = torch.cat([ts.Random(budget=16, seed=s).subset(N, 16) for s in range(100)])
    assert seen.unique().numel() == N  # every token can be drawn


def top_visual(attention_row: torch.Tensor, visual: torch.Tensor, keep: int) -> torch.Tensor:
    """Image-slot indices of the `keep` image columns of a (S,) attention row with the most weight."""
    columns = visual.nonzero().flatten()
    order = attention_row[columns].argsort(descending=True, stable=True)[:keep]
    return order.sort().values


@pytest.mark.parametrize("layer", [1, 2])
def test_fastv_keeps_the_top_attention_receivers(model, eager_model, batch, layer):
    """The eager model's own attention weights (output_attentions) at layer K-1, last row, mean over
    heads: its top image columns are what FastV kept, while the compressed model stays on SDPA."""
    method = ts.FastV(kept=16, layer=layer)
    with ts.compress(model, method) as handle:
        forward_logits(model, batch)
        assert model.config.text_config._attn_implementation == "sdpa"
    for i, row in enumerate(rows_of(batch)):
        with torch.no_grad():
            attentions = eager_model(**row, output_attentions=True).attentions
        received = attentions[layer - 1][0, :, -1].float().mean(0)
        expected = top_visual(received, row["input_ids"][0] == IMAGE_TOKEN, 16)
        assert torch.equal(handle.stats.kept[i]["fastv"], expected)


def language_inputs(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs_embeds (1, S, D) and position_ids (1, S) the unwrapped model hands its language model."""
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    embeds = seen["inputs_embeds"]
    positions = seen.get("position_ids")
    return embeds, positions if positions is not None else torch.arange(embeds.shape[1])[None]


def run_layer(layer, hidden: torch.Tensor, rotary, rows: torch.Tensor, positions: torch.Tensor):
    """One eager decoder layer on the rows `rows` of the prompt: (output (1, S', D), attention
    weights (S', S') averaged over heads), with a causal mask over those rows only."""
    captured = []
    hook = layer.self_attn.register_forward_hook(lambda m, a, out: captured.append(out[1]))
    size = rows.numel()
    mask = torch.full((size, size), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    try:
        out = layer(hidden, attention_mask=mask, position_embeddings=tuple(t[:, rows] for t in rotary),
                    position_ids=positions[:, rows])
    finally:
        hook.remove()
    return out, captured[0][0].float().mean(0)


def by_hand(model, inputs: dict, boundaries: list[int], counts: list[int], read_previous: bool):
    """One unpadded prompt through the eager language model layer by layer, dropping image rows before
    each boundary layer l: the top image columns of the last row's attention at layer l - 1 as it ran
    (read_previous, FastV) or of layer l on the current rows (PDrop). Returns the kept image slots per
    boundary and the last position's logits (V,)."""
    lm = model.model.language_model
    hidden, positions = language_inputs(model, inputs)
    rotary = lm.rotary_emb(hidden, positions)
    image = inputs["input_ids"][0] == IMAGE_TOKEN
    slots = image.cumsum(0) - 1
    rows = torch.arange(hidden.shape[1])
    kept, weights = [], None
    with torch.no_grad():
        for index, layer in enumerate(lm.layers):
            if index in boundaries:
                if not read_previous:
                    _, weights = run_layer(layer, hidden, rotary, rows, positions)
                top = top_visual(weights[-1], image[rows], counts[boundaries.index(index)])
                visual_rows = image[rows].nonzero().flatten()
                keep = torch.cat([(~image[rows]).nonzero().flatten(), visual_rows[top]]).sort().values
                hidden, rows = hidden[:, keep], rows[keep]
                kept.append(slots[rows[image[rows]]])
            hidden, weights = run_layer(layer, hidden, rotary, rows, positions)
        logits = model.lm_head(lm.norm(hidden))[0, -1].float()
    return kept, logits


@pytest.mark.parametrize("layer", [1, 2])
def test_fastv_equals_layer_by_layer_reference(model, eager_model, batch, layer):
    with ts.compress(model, ts.FastV(kept=16, layer=layer)) as handle:
        logits = forward_logits(model, batch)
    for i, row in enumerate(rows_of(batch)):
        kept, expected = by_hand(eager_model, row, [layer], [16], read_previous=True)
        assert torch.equal(handle.stats.kept[i]["fastv"], kept[0])
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,boundaries,counts", [
    (ts.PDrop(ratio=0.3), [1, 2, 3], [16, 8, 5]),
    (ts.PDrop(layers=(1, 3)), [1, 3], [72, 36]),  # the authors' ratios: int(144 / 2), int(144 / 4)
])
def test_pdrop_keeps_the_top_receivers_at_each_boundary(model, eager_model, batch, method, boundaries, counts):
    """At every boundary, the eager layer's own attention on the current rows (last row, mean over
    heads) ranks the image tokens; the by-hand pass keeps its top ones and gives the same logits."""
    with ts.compress(model, method) as handle:
        logits = forward_logits(model, batch)
    assert [stage.layer for stage in handle.schedule.stages] == boundaries
    for i, row in enumerate(rows_of(batch)):
        kept, expected = by_hand(eager_model, row, boundaries, counts, read_previous=False)
        assert [handle.stats.kept[i][f"drop{s + 1}"].tolist() for s in range(len(boundaries))] == [k.tolist() for k in kept]
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- other families
OTHER = {
    "random": ts.Random(ratio=0.25),
    "divprune": ts.DivPrune(ratio=0.25),
    "fastv": ts.FastV(ratio=0.6),
    "pdrop": ts.PDrop(ratio=0.3),
}
CLASSES = {"random": ts.Random, "divprune": ts.DivPrune, "fastv": ts.FastV, "pdrop": ts.PDrop}


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava_next"])
def family(request):
    if request.param == "qwen2_5_vl":
        model = tiny_qwen("qwen2_5_vl")
        batch = qwen_inputs("qwen2_5_vl", [(3, (16, 16), 4), (6, (16, 20), 2)])
        return model, batch, [qwen_row(batch, 0), qwen_row(batch, 1)]
    model = tiny_anyres("llava_next")
    batch = anyres_inputs(model, [(5, 7), (2, 3)], SIZES)
    return model, batch, [anyres_row(batch, 0), anyres_row(batch, 1)]


@pytest.mark.parametrize("name", OTHER)
def test_other_families(family, name):
    model, batch, rows = family
    check_keep_all(model, batch, CLASSES[name](ratio=1.0))
    with ts.compress(model, OTHER[name]) as handle:
        forward_logits(model, batch)
    layers = handle.stats.tokens_per_layer
    assert (layers[:, -1] < layers.new_tensor([item.keep.numel() for item in handle.stats.items])).all()  # it pruned
    check_generation(model, batch, name, OTHER[name])
    check_batch_equals_rows(model, batch, rows, OTHER[name], steps=3)
