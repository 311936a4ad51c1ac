"""ALVTS on the shipped small VLM (CPU): calibration fidelity per layer, and the selector overhead =
prefill with ALVTS / prefill of the same routing given for free.

    .venv/bin/python -m tokensieve.bench.alvts_overhead [--questions 64] [--rank 24] [--steps 200] [--repeats 9]

"Given for free" holds the per-layer choice of the previous prefill of the same prompt
(`handle.hold_selection()`), so the second run does the same gathers, layers and scatters but no
scoring. Ratios are measured side by side in one run (interleaved, median of paired ratios).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import tokensieve as ts

from ..calibrate import fidelity_table
from ..smallvlm import CHECKPOINT
from ..smallvlm import model as M
from ..smallvlm import scenes as S
from ..smallvlm.calibrate import calibration_inputs


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
    parser.add_argument("--model", default=str(CHECKPOINT))
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--rank", type=int, default=24)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64])
    args = parser.parse_args()
    model, processor = M.load(args.model)
    text = model.config.text_config
    print(f"small VLM {args.model}: {text.num_hidden_layers} Llama layers x {text.hidden_size}, 576 visual tokens; "
          f"{torch.get_num_threads()} CPU threads")
    start = time.perf_counter()
    selectors = ts.calibrate_alvts(model, calibration_inputs(processor, args.questions), rank=args.rank,
                                   steps=args.steps, lr=args.lr, start_layer=0, ratio=64 / 576, progress=False)
    print(f"\ncalibration: {args.questions} questions, rank {args.rank}, {args.steps} steps/layer, "
          f"{time.perf_counter() - start:.0f} s; fidelity on the calibration questions at k = 64/576:")
    print(fidelity_table(selectors))
    sample = S.split_samples("val", 1)[0]
    inputs = dict(processor(images=[sample.image], text=[M.prompt(sample.question)], return_tensors="pt"))
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
