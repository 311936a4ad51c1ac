"""DART and VisionZip: the test contract on a tiny LLaVA-1.5, slow by-hand references of their
selections, LLaVA-NeXT and Qwen2.5-VL runs, and their budget -> schedule arithmetic."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

import tokensieve as ts
from contract import (
    check_attention_implementations,
    check_batch_equals_rows,
    check_cache_generation,
    check_keep_all,
    check_removal,
    check_schedule_counts,
    forward_logits,
    greedy,
    module_snapshot,
)
from test_family_llava import row_inputs
from tiny import IMAGE_TOKEN, llava_inputs, tiny_llava
from tiny_llava_next import SIZES, anyres_inputs, newline_rows, packed_images, tiny_anyres
from tiny_llava_next import row_inputs as anyres_row
from tiny_qwen import qwen_inputs, row, tiny_qwen
from tokensieve.methods.dart import split_evenly
from tokensieve.methods.replay import Replay
from tokensieve.methods.visionzip import contextual_count
from tokensieve.ops.received_attention import received_attention

N = 144
DART_T = ts.DART(ratio=0.6)  # mean 86.4 of 144 over 4 layers: all 144 in layers 0-1, then 29
ZIP_T = ts.VisionZip(ratio=64 / 576)  # 16 of 144 = 13 dominant + 3 contextual
METHODS = {"dart": DART_T, "visionzip": ZIP_T}
PER_LAYER = {"dart": [N, N, 29, 29], "visionzip": [16] * 4}
ZIP_QWEN = ts.VisionZip(ratio=0.25)  # 64 -> 16 = 13 + 3, 80 -> 20 = 17 + 3


@pytest.fixture(scope="module")
def model(batch):
    model = tiny_llava("sdpa")
    forward_logits(model, batch)  # transformers adds its output-capturing hooks at the first forward
    return model


@pytest.fixture(scope="module")
def batch():
    return llava_inputs(tiny_llava("sdpa"), [(5, 7), (2, 3)])


def hooked(name: str):
    """The modules each method's hooks must be on (the runtime's, plus VisionZip's feature layer: -2 of 2 = 0)."""
    common = ["model", "model.language_model", "model.multi_modal_projector", "model.language_model.layers.1"]
    extra = {"dart": [], "visionzip": ["model.vision_tower.encoder.layers.0"]}[name]
    return lambda model: common + extra


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("method", [ts.DART(ratio=1.0), ts.VisionZip(ratio=1.0)], ids=["dart", "visionzip"])
def test_keep_all_is_identical(model, batch, method):
    check_keep_all(model, batch, method)


@pytest.mark.parametrize("name", METHODS)
def test_removal_restores_model(model, batch, name):
    check_removal(model, batch, METHODS[name], hooked(name))


@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_each_row(model, batch, name):
    check_batch_equals_rows(model, batch, [row_inputs(batch, 0), row_inputs(batch, 1)], METHODS[name])


@pytest.mark.parametrize("name", METHODS)
def test_tokens_per_layer_follow_schedule(model, batch, name):
    handle = check_schedule_counts(model, batch, METHODS[name], [N, N])
    assert handle.stats.tokens_per_layer.tolist() == [PER_LAYER[name]] * 2  # written out by hand


@pytest.mark.parametrize("name", METHODS)
def test_sdpa_and_eager_agree(batch, name):
    check_attention_implementations(tiny_llava, batch, METHODS[name])


def test_visionzip_cache_generation_equals_no_cache(model, batch):
    check_cache_generation(model, batch, ZIP_T)


def check_cached_equals_held(model, inputs: dict, method, steps: int = 5) -> None:
    """Cached generation equals generation without a cache that replays the prefill's kept tokens
    at every step (DART's text pivots would otherwise see the generated tokens), and its first token
    is the compressed forward's argmax."""
    with ts.compress(model, method) as handle:
        first = forward_logits(model, inputs).argmax(-1)
        cached = greedy(model, inputs, steps)
        replay = Replay.from_handle(handle)  # the selection of generate's prefill
    with ts.compress(model, replay):
        held = greedy(model, inputs, steps, use_cache=False)
    assert torch.equal(cached[:, 0], first)
    assert torch.equal(cached, held), (cached, held)


def test_dart_cached_generation_equals_held_recomputation(model, batch):
    check_cached_equals_held(model, batch, DART_T)


# ---------------------------------------------------------------------------------------------- DART by hand
def reference_dart(model, inputs: dict, keep: int, layer: int = 2) -> list[int]:
    """DART's kept image tokens of one unpadded prompt, from the unwrapped model's hidden states with
    k_proj and RoPE applied here, following the authors' loop (pivots in sequence order)."""
    lm = model.model.language_model
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states
        before, after = states[layer - 1], states[layer]  # input and output of layer K-1
        attn = lm.layers[layer - 1].self_attn
        k = attn.k_proj(lm.layers[layer - 1].input_layernorm(before))
        k = k.view(1, k.shape[1], -1, attn.head_dim).transpose(1, 2)
        cos, sin = lm.rotary_emb(before, torch.arange(ids.numel())[None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        norm = k[0].transpose(0, 1).reshape(ids.numel(), -1).abs().sum(-1).tolist()
        hidden = lm.norm(after)[0]
    image = [i for i in range(ids.numel()) if ids[i] == IMAGE_TOKEN]
    text = [i for i in range(image[-1] + 1, ids.numel())]
    image_pivots = sorted(sorted(image, key=lambda i: -norm[i])[:4])
    text_pivots = sorted(sorted(text, key=lambda i: -norm[i])[:4])
    pivots = image_pivots + text_pivots
    kept, candidates = set(image_pivots), [i for i in image if i not in image_pivots]
    for pivot, quota in zip(pivots, split_evenly(keep - 4, len(pivots))):
        cosine = {i: float(hidden[pivot] @ hidden[i] / (hidden[pivot].norm() * hidden[i].norm())) for i in candidates}
        picked = sorted(candidates, key=lambda i: cosine[i])[:quota]
        kept.update(picked)
        candidates = [i for i in candidates if i not in picked]
    return sorted(i - image[0] for i in kept)


@pytest.mark.parametrize("index", [0, 1])  # 7 text tokens after the image (4 text pivots), then 3 (3 pivots)
def test_dart_keeps_what_the_slow_reference_keeps(model, batch, index):
    inputs = row_inputs(batch, index)
    with ts.compress(model, DART_T) as handle:
        forward_logits(model, inputs)
    assert handle.stats.kept[0]["dart"].tolist() == reference_dart(model, inputs, keep=29)


def test_split_evenly():
    assert split_evenly(128, 8) == [16] * 8  # the authors' "128": 4 + 8 * 16 = 132
    assert split_evenly(25, 7) == [4, 4, 4, 4, 3, 3, 3]


# ---------------------------------------------------------------------------------------------- VisionZip by hand
def reference_visionzip(model, pixel_values: torch.Tensor, keep: int, contextual: int):
    """Per image: the kept token indices and the (keep, D_vision) features the projector should receive,
    from the eager tower's own attention probabilities (layer 0 makes hidden_states[-2] of this 2-layer
    tower) and the layer's keys computed here, merged by the authors' rule in plain loops."""
    with torch.no_grad():
        tower = model.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
        layer = model.model.vision_tower.encoder.layers[0]
        keys = layer.self_attn.k_proj(layer.layer_norm1(tower.hidden_states[0]))
        keys = keys.view(*keys.shape[:2], layer.self_attn.num_heads, -1).mean(2)[:, 1:]
    results = []
    for image in range(pixel_values.shape[0]):
        features, key = tower.hidden_states[1][image, 1:], keys[image]
        cls_attention = tower.attentions[0][image, :, 0, 1:].sum(0)
        dominant = set(cls_attention.topk(keep - contextual).indices.tolist())
        rest = [i for i in range(N) if i not in dominant]
        targets = rest[:: max(1, len(rest) // contextual)][:contextual]
        groups = {t: [] for t in targets}
        for i in rest:
            if i not in groups:
                groups[max(targets, key=lambda t: float(F.cosine_similarity(key[i], key[t], dim=0)))].append(i)
        rows = {i: features[i] for i in dominant}
        rows.update({t: features[t] + (features[m].mean(0) if m else 0) for t, m in groups.items()})
        results.append((sorted(rows), torch.stack([rows[i] for i in sorted(rows)])))
    return results


def test_visionzip_dominant_and_merge_equal_the_slow_reference(model, batch):
    expected = reference_visionzip(tiny_llava("eager"), batch["pixel_values"], keep=16, contextual=3)
    received = []
    with ts.compress(model, ZIP_T) as handle:
        hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: received.append(args[0]))
        forward_logits(model, batch)
        hook.remove()
    assert model.config.vision_config._attn_implementation == "sdpa"
    for i, (kept, features) in enumerate(expected):
        assert handle.stats.kept[i]["stage1"].tolist() == kept
        torch.testing.assert_close(received[0][i][kept], features, rtol=1e-5, atol=1e-5)  # the projector's rows
        assert not received[0][i][[r for r in range(N) if r not in kept]].any()  # zeros where nothing is kept


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT, Qwen2.5-VL
@pytest.fixture(scope="module")
def anyres():
    model = tiny_anyres("llava_next")
    return model, anyres_inputs(model, [(5, 6), (3, 4)], SIZES)


@pytest.mark.parametrize("method", [ts.DART(ratio=0.7), ts.VisionZip(ratio=0.2)], ids=["dart", "visionzip"])
def test_llava_next_rows_and_counts(anyres, method):
    model, batch = anyres
    check_keep_all(model, batch, type(method)(ratio=1.0))
    check_batch_equals_rows(model, batch, [anyres_row(batch, 0), anyres_row(batch, 1)], method, steps=2)
    with ts.compress(model, method) as handle:
        forward_logits(model, batch)
    packed = packed_images(model, batch["pixel_values"], batch["image_sizes"])
    for i, image in enumerate(packed):
        newlines = int(newline_rows(model, image).sum())
        expected = [t + newlines for t in handle.schedule.tokens_per_layer(image.shape[0] - newlines)]
        assert handle.stats.tokens_per_layer[i].tolist() == expected
        assert handle.stats.tokens_per_layer[i, -1] < image.shape[0]


@pytest.fixture(scope="module")
def qwen():
    model = tiny_qwen("qwen2_5_vl")
    return model, qwen_inputs("qwen2_5_vl", [(3, (16, 16), 6), (6, (16, 20), 2)])


@pytest.mark.parametrize("method", [ts.DART(ratio=0.7), ZIP_QWEN], ids=["dart", "visionzip"])
def test_qwen25_contract(qwen, method):
    model, batch = qwen
    check_keep_all(model, batch, type(method)(ratio=1.0))
    check_batch_equals_rows(model, batch, [row(batch, 0), row(batch, 1)], method, steps=2)
    handle = check_schedule_counts(model, batch, method, [64, 80])
    assert handle.stats.tokens_per_layer[0, -1] < 64
    if isinstance(method, ts.VisionZip):
        check_cache_generation(model, batch, method, steps=3)
    else:
        check_cached_equals_held(model, batch, method, steps=3)


def test_qwen25_visionzip_dominant_tokens_receive_most_attention(qwen):
    """With no contextual tokens, the kept tokens are the merge groups whose patches receive the most
    attention in the last ViT block (eager attention from its own q/k, computed here per image)."""
    model, batch = qwen
    inputs = row(batch, 1)
    visual = model.model.visual
    block, seen = visual.blocks[-1], {}
    hook = block.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs, hidden=args[0]), with_kwargs=True)
    with torch.no_grad(), ts.compress(model, ts.VisionZip(budget=20, contextual=0)) as handle:
        model(**inputs)
    hook.remove()
    with torch.no_grad():
        qkv = block.attn.qkv(block.norm1(seen["hidden"])).view(-1, 3, block.attn.num_heads, block.attn.head_dim)
        q, k = apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], *seen["position_embeddings"])  # (S, H, d)
        q, k = q.transpose(0, 1), k.transpose(0, 1)
        received = (q @ k.transpose(1, 2) * block.attn.scaling).softmax(-1).mean(0).sum(0)  # one image: one segment
    window_order = received.view(-1, 4).mean(1)  # per merge group, in the blocks' window order
    config = visual.config
    window_index, _ = get_vision_window_index(inputs["image_grid_thw"], config.spatial_merge_size,
                                              config.window_size, config.patch_size)
    raster = torch.empty_like(window_order)
    raster[window_index] = window_order
    assert handle.stats.kept[0]["stage1"].tolist() == sorted(raster.topk(20).indices.tolist())


@pytest.mark.parametrize("chunk_elements", [1, 3 * 4 * 37, 1 << 21])
def test_received_attention_in_row_chunks_equals_the_whole_map(chunk_elements):
    """1 row, 3 rows (a last chunk of 1) or all 37 rows at a time: the same column sums."""
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 37, 8, generator=generator), torch.randn(4, 37, 8, generator=generator)
    whole = (q @ k.transpose(1, 2) * 0.3).softmax(-1).mean(0).sum(0)
    assert torch.allclose(received_attention(q, k, 0.3, chunk_elements), whole, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_other_qwen_visionzip_rows_and_counts(model_type):
    model = tiny_qwen(model_type)
    batch = qwen_inputs(model_type, [(3, (16, 16), 6), (6, (16, 20), 2)])
    check_batch_equals_rows(model, batch, [row(batch, 0), row(batch, 1)], ZIP_QWEN, steps=1)
    check_schedule_counts(model, batch, ZIP_QWEN, [64, 80])


# ---------------------------------------------------------------------------------------------- budgets and errors
def test_dart_budgets_on_llava15_7b_shape():
    kept = {b: ts.DART(budget=b).kept_after(576, 32) for b in (192, 128, 64, 159.75)}
    assert kept == {192: 166, 128: 98, 64: 30, 159.75: 132}  # 159.75: the authors' "128" (4 + 8 * 16)
    schedule = ts.DART(budget=128).schedule(32)
    assert schedule.tokens_per_layer(576) == [576, 576] + [98] * 30
    with pytest.raises(ValueError, match="at least 39.75; raise the budget or lower layer"):
        ts.DART(budget=39).kept_after(576, 32)


def test_visionzip_budgets_on_llava15_7b_shape():
    schedule = ts.VisionZip(budget=64).schedule(32)
    assert schedule.tokens_per_layer(576) == [64] * 32
    assert [(b - contextual_count(b, 10 / 64), contextual_count(b, 10 / 64)) for b in (192, 128, 64, 32)] == [
        (162, 30), (108, 20), (54, 10), (27, 5)]


@pytest.mark.parametrize("make,message", [
    (lambda: ts.DART(), "needs a budget"),
    (lambda: ts.DART(budget=64, pivots=7), "even number"),
    (lambda: ts.DART(budget=64, layer=0), "at least 1"),
    (lambda: ts.VisionZip(), "needs a budget"),
    (lambda: ts.VisionZip(budget=64, contextual=10), r"in \[0, 1\)"),
])
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_refusals_leave_the_model_untouched(model):
    before = module_snapshot(model)
    with pytest.raises(ValueError, match="at least 74; raise the budget"):
        ts.compress(model, ts.DART(budget=72))  # layers 0-1 hold 144 each: nothing left for layers 2-3
    with pytest.raises(ValueError, match="'full' hands"):
        model.config.vision_feature_select_strategy = "full"
        try:
            ts.compress(model, ZIP_T)
        finally:
            model.config.vision_feature_select_strategy = "default"
    assert module_snapshot(model) == before
    onevision = tiny_anyres("llava_onevision")
    before = module_snapshot(onevision)
    with pytest.raises(ValueError, match="no encoder layer's rows"):
        ts.compress(onevision, ZIP_T)
    assert module_snapshot(onevision) == before
