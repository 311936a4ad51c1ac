"""ALVTS on the demo's LLaVA-1.5-shaped model (random weights, CPU): calibration fidelity per layer,
and the selector overhead = prefill with ALVTS / prefill of the same routing given for free.

    .venv/bin/python bench/alvts_overhead.py [--samples 12] [--rank 32] [--steps 100] [--repeats 9]

"Given for free" holds the per-layer choice of the previous prefill of the same prompt
(`handle.hold_selection()`), so the second run does the same gathers, layers and scatters but no
scoring. Ratios are measured side by side in one run (interleaved, median of paired ratios).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import tokensieve as ts
from tokensieve.demo import DemoConfig, WordVocab, build_model, demo_inputs, scene_image


def random_scene(seed: int, size: int = 336) -> Image.Image:
    """The demo scene with a few extra shapes at seeded places and colours (calibration variety)."""
    rng = np.random.default_rng(seed)
    image = scene_image(size)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.integers(0, size - 40, 2)
        w, h = rng.integers(8, 60, 2)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([int(x), int(y), int(x + w), int(y + h)], fill=colour)
    return image


def timed_prefill(model, inputs: dict) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start


def overhead(model, inputs: dict, method, repeats: int) -> tuple[float, float, float]:
    """(median ALVTS prefill s, median held prefill s, median of the paired ratios)."""
    scored, held, ratios = [], [], []
    with ts.compress(model, method) as handle:
        timed_prefill(model, inputs)  # warm-up, and the choice the held runs replay
        for _ in range(repeats):
            handle.hold_selection(False)
            a = timed_prefill(model, inputs)
            handle.hold_selection(True)
            b = timed_prefill(model, inputs)
            scored.append(a), held.append(b), ratios.append(a / b)
    return statistics.median(scored), statistics.median(held), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64])
    args = parser.parse_args()
    torch.manual_seed(0)
    config, vocab = DemoConfig(), WordVocab()
    model = build_model(config, vocab)
    samples = [demo_inputs(config, vocab, random_scene(seed)) for seed in range(args.samples)]
    print(f"LLaVA-1.5-shaped model, random weights: {config.text_layers} Llama layers x {config.text_width}, "
          f"576 visual tokens; {torch.get_num_threads()} CPU threads")
    start = time.perf_counter()
    selectors = ts.calibrate_alvts(model, samples, rank=args.rank, steps=args.steps, lr=args.lr, start_layer=0,
                                   ratio=64 / 576, progress=False)
    print(f"\ncalibration: {args.samples} samples, rank {args.rank}, {args.steps} steps/layer, "
          f"{time.perf_counter() - start:.0f} s; fidelity on the calibration samples at k = 64/576:")
    from tokensieve.calibrate import fidelity_table

    print(fidelity_table(selectors))
    inputs = demo_inputs(config, vocab, scene_image())
    full = statistics.median(timed_prefill(model, inputs) for _ in range(args.repeats))
    print(f"\nfull prefill {1000 * full:.1f} ms")
    print("budget  selectors   mean tok/layer  ALVTS ms  given-for-free ms  ALVTS/free  vs full  selection FLOPs share")
    for budget in args.budgets:
        for name, chosen in (("svd", None), ("calibrated", selectors)):
            method = ts.ALVTS(budget=budget, selectors=chosen, start_layer=0, rank=args.rank)
            scored, held, ratio = overhead(model, inputs, method, args.repeats)
            with ts.compress(model, method) as handle, torch.no_grad():
                model(**inputs)
            stats = handle.stats
            print(f"{budget:>6}  {name:<10}  {float(stats.mean_tokens_per_layer[0]):>14.1f}  {1000 * scored:>8.1f}"
                  f"  {1000 * held:>17.1f}  {ratio:>10.3f}  {scored / full:>7.2f}  {stats.selection_share:>21.3f}")


if __name__ == "__main__":
    main()
