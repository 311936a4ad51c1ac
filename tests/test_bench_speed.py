"""`tokensieve bench speed` on the tiny LLaVA shape: records, oracle, FLOPs, KV cache, plot, JSON."""
from __future__ import annotations

import json

import pytest

from tokensieve.bench.speed import make_method
from tokensieve.cli import main
from tokensieve.methods.alvts import layer_counts

KEYS = {"method", "budget", "shape", "prefill_s", "oracle_prefill_s", "decode_s_per_token", "peak_memory_bytes",
        "kv_cache_bytes", "prefill_flops"}


def test_bench_speed_records(tmp_path, capsys):
    out, picture = tmp_path / "speed.json", tmp_path / "speed.png"
    status = main(["bench", "speed", "--shape", "tiny-llava", "--budgets", "128", "64", "--methods", "ApET", "ALVTS",
                   "--layers", "4", "--repeats", "1", "--new-tokens", "2", "--json", str(out), "--plot", str(picture)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| method | budget |" in printed and picture.stat().st_size > 10_000
    records = json.loads(out.read_text())
    assert all(KEYS <= set(r) for r in records)
    full, rest = records[0], records[1:]
    assert full["method"] == "full" and full["oracle_prefill_s"] is None
    assert [(r["method"], r["budget"]) for r in rest] == [("ApET", 128), ("ALVTS", 128), ("ApET", 64), ("ALVTS", 64)]
    for r in rest:
        assert abs(r["mean_tokens_per_layer"] - r["budget"]) < 1
        assert r["oracle_prefill_s"] > 0 and r["selection_flops"] > 0
        assert r["kv_cache_bytes"] < full["kv_cache_bytes"]
        assert r["prefill_flops"] - r["selection_flops"] < full["prefill_flops"]
        assert r["ideal_speedup"] > 1
    apet64 = next(r for r in rest if r["method"] == "ApET" and r["budget"] == 64)
    apet128 = next(r for r in rest if r["method"] == "ApET" and r["budget"] == 128)
    assert apet64["kv_cache_bytes"] < apet128["kv_cache_bytes"] and apet64["ideal_speedup"] > apet128["ideal_speedup"]


def test_bench_speed_rejects_unknown_method(capsys):
    assert main(["bench", "speed", "--shape", "tiny-llava", "--methods", "Magic"]) == 2
    assert "unknown method" in capsys.readouterr().err


@pytest.mark.parametrize("visual_tokens", [576, 2880])
@pytest.mark.parametrize("budget", [64, 128, 192, 320, 640, 960])
def test_bench_alvts_starts_routing_at_layer_1_whenever_that_budget_allows_it(visual_tokens, budget):
    """LLaVA-NeXT's 2880 tokens at 640 cannot afford a full layer 0 on 4 layers; 576 at 192 can."""
    method = make_method("ALVTS", budget, 4, visual_tokens)

    def feasible(start: int) -> bool:
        try:
            layer_counts(visual_tokens, budget, 4, start)
        except ValueError:
            return False
        return True

    assert feasible(method.start_layer)
    assert method.start_layer == (1 if feasible(1) else 0)


def test_bench_speed_runs_the_qwen_shape_with_its_windowed_vit_and_mrope(tmp_path):
    """Prefill, decoding over the cache (M-RoPE positions) and generate, on the Qwen2.5-VL structure."""
    out = tmp_path / "speed.json"
    status = main(["bench", "speed", "--shape", "tiny-qwen2.5-vl", "--resolution", "224", "--budgets", "32",
                   "--methods", "ApET", "ALVTS", "--repeats", "1", "--new-tokens", "2", "--json", str(out),
                   "--plot", str(tmp_path / "speed.png")])
    assert status == 0
    full, *rest = json.loads(out.read_text())
    assert full["mean_tokens_per_layer"] == 64 and [r["method"] for r in rest] == ["ApET", "ALVTS"]
    for r in rest:
        assert abs(r["mean_tokens_per_layer"] - 32) < 1 and r["kv_cache_bytes"] < full["kv_cache_bytes"]
        assert r["decode_s_per_token"] > 0 and r["end_to_end_s"] > 0


@pytest.mark.parametrize("shape", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_tied_layers_compute_what_untied_layers_holding_the_same_weights_compute(shape):
    """`--tied-layers`: three layers sharing layer 0's tensors give the logits and greedy tokens of three
    separate layers loaded with those weights (so each layer has its own cache slot), in one layer's memory."""
    import torch

    from tokensieve.bench.shapes import build
    from tokensieve.models import family_for

    _, tied = build(shape, 3, 2, torch.float32, resolution=224, tied_layers=True)
    _, separate = build(shape, 3, 2, torch.float32, resolution=224)
    separate.model.load_state_dict(tied.model.state_dict())
    layers = family_for(tied.model).parts(tied.model).layers
    assert len(layers) == 3 and layers[2].self_attn.q_proj.weight is layers[0].self_attn.q_proj.weight
    assert layers[2].self_attn.layer_idx == 2
    with torch.no_grad():
        expected = separate.model(**separate.inputs).logits
        got = tied.model(**separate.inputs).logits
        torch.testing.assert_close(got, expected)
        options = dict(max_new_tokens=3, do_sample=False)
        assert torch.equal(tied.model.generate(**separate.inputs, **options),
                           separate.model.generate(**separate.inputs, **options))


def test_bench_speed_prefill_only_on_tied_layers(tmp_path, capsys):
    """A deep build as a CPU affords it: 4 tied layers, FastV past its layer 2, prefill and oracle timed only."""
    out = tmp_path / "speed.json"
    status = main(["bench", "speed", "--shape", "tiny-llava", "--budgets", "400", "--methods", "FastV", "--layers", "4",
                   "--tied-layers", "--prefill-only", "--repeats", "1", "--json", str(out),
                   "--plot", str(tmp_path / "speed.png")])
    assert status == 0
    assert "4 decoder (sharing one layer's weights)" in capsys.readouterr().out
    full, fastv = json.loads(out.read_text())
    assert full["decoder_layers"] == 4 and fastv["method"] == "FastV" and abs(fastv["mean_tokens_per_layer"] - 400) < 1
    assert fastv["oracle_prefill_s"] > 0 and fastv["decode_s_per_token"] is None and fastv["end_to_end_s"] is None
