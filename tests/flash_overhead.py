"""Each method's selection overhead under SDPA and under FlashAttention-2 (the CPU stand-in kernels behind
transformers' real FlashAttention path), measured one after the other in one run.

    .venv/bin/python tests/flash_overhead.py [--shape llava-1.5-7b] [--layers 2] [--budgets 64] [--methods ...]

A CPU's absolute times say nothing about a GPU, and the stand-in is no fast kernel; what can be checked
here is that a method's overhead (its prefill over its oracle's: the same schedule with the selection
given for free, timed in alternation with it) stays what it is under SDPA, i.e. that nothing in the
FlashAttention path (masks, unpadding, attention computed outside the kernel) costs a method more.
Not a test: it prints figures (docs/flash-attention.md quotes them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from flash_stand_in import as_flash, flash_kernels  # noqa: E402
from tokensieve.bench import speed  # noqa: E402


def built_under(attn: str, build):
    """`speed.build` building the SDPA model and switching it to `attn` (set_attn_implementation would look
    for an installed kernel)."""

    def build_then_switch(name, layers, vision_layers, dtype, _attn="sdpa", *args, **kwargs):
        shape, built = build(name, layers, vision_layers, dtype, "sdpa", *args, **kwargs)
        as_flash(built.model, attn)
        return shape, built

    return build_then_switch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llava-1.5-7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64])
    parser.add_argument("--methods", nargs="+", default=["ApET", "ALVTS", "FastV", "PDrop", "DART", "VisionZip"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = dict(budgets=tuple(args.budgets), methods=tuple(args.methods), layers=args.layers,
                   vision_layers=args.vision_layers, repeats=args.repeats, new_tokens=2, decode_steps=2, progress=False)
    results = {"sdpa": speed.run_speed(args.shape, **options)[0]}
    with flash_kernels(), mock.patch.object(speed, "build", built_under("flash_attention_2", speed.build)):
        results["flash_attention_2"] = speed.run_speed(args.shape, attn="flash_attention_2", **options)[0]
    print(f"{args.shape}, {args.layers} decoder + {args.vision_layers} vision layers, float32, CPU, {args.threads} "
          "thread(s); overhead = prefill / "
          "oracle prefill; speed-up = full prefill / prefill, each under its own attention")
    print("| method | budget | overhead SDPA | overhead FA2 (stand-in) | speed-up SDPA | speed-up FA2 (stand-in) |")
    print("|---|---|---|---|---|---|")
    for a, b in zip(results["sdpa"][1:], results["flash_attention_2"][1:]):
        print(f"| {a.method} | {a.budget} | {a.overhead:.3f} | {b.overhead:.3f} | {a.speedup:.2f} | {b.speedup:.2f} |")
    full_a, full_b = results["sdpa"][0], results["flash_attention_2"][0]
    print(f"full prefill: SDPA {1000 * full_a.prefill_s:.0f} ms, FA2 stand-in {1000 * full_b.prefill_s:.0f} ms")


if __name__ == "__main__":
    main()
