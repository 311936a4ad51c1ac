"""The `tokensieve` command.

    tokensieve demo [--budget 64] [--scenes 3] [--out PATH]
    tokensieve calibrate MODEL_DIR --images IMG... [--prompt TEXT] --out SELECTORS [--rank 256] [--steps 200]
    tokensieve bench speed [--shape llava-1.5-7b] [--budgets 192 128 64] [--json PATH]
    tokensieve bench accuracy [--budgets 192 128 64 32] [--limit N] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokensieve", description="Visual token compression for Hugging Face vision-language models."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="the shipped small VLM answers questions uncompressed and with every method at one budget",
        description="Loads the small VLM the project trained (bench/vlm/checkpoint), asks it questions about new "
        "synthetic scenes uncompressed and with every method at the budget, prints the answers, the prefill time "
        "and visual tokens per layer of each, and writes a picture of the tokens each method kept. No download, "
        "CPU. Needs the repository checkout (bench/ beside src/).",
    )
    demo.add_argument("--budget", type=_positive_int, default=64,
                      help="mean visual tokens per decoder layer (default: %(default)s)")
    demo.add_argument("--scenes", type=_positive_int, default=3, help="scenes, two questions each (default: %(default)s)")
    demo.add_argument("--model", default=None, help="small VLM folder (default: the shipped checkpoint)")
    demo.add_argument("--out", default="out/demo_kept_tokens.png", help="PNG of the kept tokens (default: %(default)s)")
    demo.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    demo.add_argument("--seed", type=int, default=0, help="which new scenes (default: %(default)s)")
    demo.set_defaults(run=_run_demo)
    _add_calibrate(commands)
    _add_bench(commands)
    return parser


def _add_bench(commands) -> None:
    from .bench.shapes import SHAPES
    from .bench.speed import METHOD_NAMES

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", metavar="BENCH")
    bench.required = True
    speed = bench.add_parser(
        "speed", help="prefill/decode time, memory, KV cache and FLOPs of each method on a real model shape",
        description="Builds a model of a real shape with random weights and measures every method at every budget "
        "beside its oracle (the same schedule with the selection given for free) and the full model.",
    )
    speed.add_argument("--shape", default="llava-1.5-7b", choices=sorted(SHAPES), help="preset (default: %(default)s)")
    speed.add_argument("--budgets", type=_positive_int, nargs="+", default=[192, 128, 64])
    speed.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), help="(default: every available one)")
    speed.add_argument("--layers", type=_positive_int, default=4, help="decoder layers built (default: %(default)s)")
    speed.add_argument("--vision-layers", type=_positive_int, default=2, help="vision layers built (default: %(default)s)")
    speed.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    speed.add_argument("--device", default="cuda" if _cuda() else "cpu")
    speed.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    speed.add_argument("--repeats", type=_positive_int, default=2, help="timed runs after a warm-up (default: %(default)s)")
    speed.add_argument("--new-tokens", type=_positive_int, default=4, help="tokens generated end to end (default: %(default)s)")
    speed.add_argument("--resolution", type=_positive_int, default=448, help="image side for qwen2.5-vl-7b")
    speed.add_argument("--json", help="write the records here")
    speed.add_argument("--plot", default="out/bench_speed.png", help="PNG of speed-up and overhead (default: %(default)s)")
    speed.set_defaults(run=_run_bench_speed)
    accuracy = bench.add_parser(
        "accuracy", help="held-out accuracy of every method at every budget on the shipped small VLM",
        description="Runs the uncompressed small VLM (trained by the project, bench/vlm/checkpoint) and every method "
        "at every budget on its held-out synthetic questions; prints accuracy, retention per question kind, mean "
        "visual tokens per decoder layer and prefill FLOPs, and plots retention against budget and FLOPs. "
        "Needs the repository checkout (bench/ beside src/).",
    )
    accuracy.add_argument("--model", default=None, help="small VLM folder (default: the shipped checkpoint)")
    accuracy.add_argument("--budgets", type=_positive_int, nargs="+", default=[192, 128, 64, 32])
    accuracy.add_argument("--methods", nargs="+", default=None, help="(default: every available one)")
    accuracy.add_argument("--limit", type=_positive_int, default=None,
                          help="evaluate the first N held-out questions only (default: 1000)")
    accuracy.add_argument("--split", default="test", help="held-out split (default: %(default)s)")
    accuracy.add_argument("--batch", type=_positive_int, default=50, help="questions per forward (default: %(default)s)")
    accuracy.add_argument("--seed", type=int, default=0, help="seed of the Random baseline (default: %(default)s)")
    accuracy.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    accuracy.add_argument("--json", help="write the records here")
    accuracy.add_argument("--plot", default="out/bench_accuracy.png", help="PNG of retention (default: %(default)s)")
    accuracy.set_defaults(run=_run_bench_accuracy)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_bench_speed(args: argparse.Namespace) -> int:
    from .bench.speed import markdown_table, plot, run_speed, write_json

    records, skipped = run_speed(args.shape, tuple(args.budgets), tuple(args.methods), args.layers, args.vision_layers,
                        args.dtype, args.device, args.repeats, args.new_tokens, decode_steps=2, attn=args.attn,
                        resolution=args.resolution)
    print(markdown_table(records))
    print(f"\n{args.shape}, {args.layers} decoder + {args.vision_layers} vision layers, {args.dtype}, {args.device}; "
          "overhead = prefill / oracle prefill (the same schedule, selection given for free); "
          "ideal = full FLOPs / method FLOPs without selection")
    for note in skipped:
        print(f"skipped {note}")
    print(f"wrote {plot(records, args.plot)}")
    if args.json:
        write_json(records, args.json)
        print(f"wrote {args.json}")
    return 0


def repository_module(name: str):
    """A module of the repository's bench/ folder (outside the library), importable from a checkout."""
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "vlm").is_dir():
        raise ValueError(f"{name} lives in the repository's bench/ folder, which is not beside this installation "
                         f"({root}); run it from a clone installed with `pip install -e .` (`make demo` does)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(name)


def _run_bench_accuracy(args: argparse.Namespace) -> int:
    import torch

    bench = repository_module("bench.accuracy")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    records, skipped = bench.run_accuracy(args.model or bench.CHECKPOINT, tuple(args.methods or bench.BENCH_NAMES),
                                          tuple(args.budgets), args.limit, args.split, args.batch, args.seed)
    print(bench.markdown_table(records))
    print("\nbudget = mean visual tokens per decoder layer; retention = accuracy / the uncompressed model's (per kind "
          "in the kind columns, %); prefill MFLOPs per question: vision tower, projector, decoder and selection")
    for note in skipped:
        print(f"skipped {note}")
    print(f"wrote {bench.plot(records, args.plot)}")
    if args.json:
        bench.write_json(records, args.json)
        print(f"wrote {args.json}")
    return 0


def _add_calibrate(commands) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="fit ALVTS selectors to a model saved in a local folder and save them (safetensors)",
        description="Runs the unpruned model on the images with the prompt, fits one low-rank selector per decoder "
        "layer to the full-rank scores, prints each layer's fidelity before and after, and saves the selectors "
        "with the model's identity.",
    )
    calibrate.add_argument("model", help="folder of a saved transformers VLM and its processor")
    calibrate.add_argument("--images", nargs="+", required=True, help="image files, or folders of them")
    calibrate.add_argument("--prompt", default="USER: <image>\nDescribe this image in detail. ASSISTANT:",
                           help="prompt with the processor's image placeholder (default: LLaVA-1.5's format)")
    calibrate.add_argument("--out", required=True, help="where to write the selectors (.safetensors)")
    calibrate.add_argument("--rank", type=_positive_int, default=256, help="selector rank (default: %(default)s)")
    calibrate.add_argument("--steps", type=_positive_int, default=200, help="Adam steps per layer (default: %(default)s)")
    calibrate.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    calibrate.add_argument("--start-layer", type=int, default=1, help="first layer with a selector (default: %(default)s)")
    calibrate.add_argument("--ratio", type=float, default=64 / 576,
                           help="budget fraction the top-k overlap is measured at (default: 64/576)")
    calibrate.set_defaults(run=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate_alvts, fidelity_table, load_model_and_samples

    model, samples = load_model_and_samples(args.model, args.images, args.prompt)
    selectors = calibrate_alvts(model, samples, rank=args.rank, steps=args.steps, lr=args.lr,
                                start_layer=args.start_layer, ratio=args.ratio, progress=True)
    print(fidelity_table(selectors))
    selectors.save(args.out)
    print(f"wrote {args.out}: selectors of rank {args.rank} for {len(selectors.layers)} layers of {args.model}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    demo = repository_module("bench.demo")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    demo.run_demo(args.model or demo.CHECKPOINT, budget=args.budget, scenes=args.scenes, out=args.out, seed=args.seed)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tokensieve` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"tokensieve {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
