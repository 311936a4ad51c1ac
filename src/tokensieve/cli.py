"""The `tokensieve` command.

    tokensieve demo [--budget 64] [--scenes 3] [--out PATH]
    tokensieve calibrate MODEL_DIR --images IMG... [--prompt TEXT] --out SELECTORS [--rank 256] [--steps 200]
                         [--dtype float32]
    tokensieve bench speed [--shape llava-1.5-7b] [--budgets 192 128 64] [--json PATH]
    tokensieve bench accuracy [--budgets 192 128 64 32] [--limit N] [--json PATH]
    tokensieve eval --model PATH --tasks T1,T2 [--methods apet alvts] [--budgets 192 128 64] [--limit N]
                    [--num-processes N]   (needs tokensieve[lmms-eval]; tokensieve/integrations/lmms_eval)

Every bad argument fails before any work (no model loaded, nothing fitted or written) with one line
on stderr, `tokensieve COMMAND: error: what is wrong; how to fix it`, and exit status 2: argparse
checks each value on its own (the `type` functions of `cli_arguments`), then the command's `check`
checks what needs more than one value or a look at the model folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import cli_arguments as arg



def _no_check(args: argparse.Namespace) -> None:
    """argparse alone checks every argument of this command."""


def build_parser() -> argparse.ArgumentParser:
    parser = arg.OneLineParser(
        prog="tokensieve", description="Visual token compression for Hugging Face vision-language models."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="the shipped small VLM answers questions uncompressed and with every method at one budget",
        description="Loads the small VLM the project trained and ships (tokensieve/smallvlm/checkpoint), asks it "
        "questions about new synthetic scenes uncompressed and with every method at the budget, prints the answers, "
        "the prefill time and visual tokens per layer of each, and writes a picture of the tokens each method kept. "
        "No download, CPU.",
    )
    demo.add_argument("--budget", type=arg.positive_int, default=64,
                      help="mean visual tokens per decoder layer (default: %(default)s)")
    demo.add_argument("--scenes", type=arg.positive_int, default=3, help="scenes, two questions each (default: %(default)s)")
    demo.add_argument("--model", default=None,
                      help="small VLM: 'local' (the first shipped model, default), 'context' (the second) or a folder")
    demo.add_argument("--out", type=arg.creatable_file, default="out/demo_kept_tokens.png",
                      help="PNG of the kept tokens (default: %(default)s)")
    demo.add_argument("--threads", type=arg.threads, default=None, help="torch CPU threads")
    demo.add_argument("--seed", type=int, default=0, help="which new scenes (default: %(default)s)")
    demo.set_defaults(run=_run_demo, check=_no_check, prog=demo.prog)
    _add_calibrate(commands)
    _add_bench(commands)
    from .integrations.lmms_eval.command import add_eval_command

    add_eval_command(commands)
    return parser


def _add_bench(commands) -> None:
    from .api import SUPPORTED_ATTENTION
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
    speed.add_argument("--budgets", type=arg.positive_int, nargs="+", default=[192, 128, 64])
    speed.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), help="(default: every available one)")
    speed.add_argument("--layers", type=arg.positive_int, default=4, help="decoder layers built (default: %(default)s)")
    speed.add_argument("--tied-layers", action="store_true",
                       help="every decoder layer shares the first one's weights: the compute of --layers layers in the "
                       "memory of one (a 32-layer 7B shape on a CPU without 26 GB to spare)")
    speed.add_argument("--prefill-only", action="store_true",
                       help="time the prefill and its oracle only (no decoding, no generate)")
    speed.add_argument("--vision-layers", type=arg.positive_int, default=2, help="vision layers built (default: %(default)s)")
    speed.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    speed.add_argument("--device", type=arg.device, default="cuda" if _cuda() else "cpu",
                       help="cpu, cuda or cuda:N (default: cuda when available)")
    speed.add_argument("--attn", default="sdpa", choices=list(SUPPORTED_ATTENTION),
                       help="attention implementation; flash_attention_2/3 need a CUDA device, a 16-bit dtype and the "
                       "flash-attn package (default: %(default)s)")
    speed.add_argument("--repeats", type=arg.positive_int, default=2, help="timed runs after a warm-up (default: %(default)s)")
    speed.add_argument("--new-tokens", type=arg.positive_int, default=4, help="tokens generated end to end (default: %(default)s)")
    speed.add_argument("--resolution", type=arg.resolution, default=448,
                       help="image side for the Qwen2.5-VL shapes, a multiple of 28 (default: %(default)s)")
    speed.add_argument("--json", type=arg.creatable_file, help="write the records here")
    speed.add_argument("--plot", type=arg.creatable_file, default="out/bench_speed.png",
                       help="PNG of speed-up and overhead (default: %(default)s)")
    speed.set_defaults(run=_run_bench_speed, check=_check_bench_speed, prog=speed.prog)
    accuracy = bench.add_parser(
        "accuracy", help="held-out accuracy of every method at every budget on the shipped small VLM",
        description="Runs the uncompressed small VLM (trained by the project, tokensieve/smallvlm/checkpoint) and "
        "every method at every budget on its held-out synthetic questions; prints accuracy, retention per question "
        "kind, mean visual tokens per decoder layer and prefill FLOPs, and plots retention against budget and FLOPs.",
    )
    accuracy.add_argument("--model", default=None,
                          help="small VLM: 'local' (the first shipped model, default), 'context' (the second, whose "
                          "visual tokens carry the scene's context) or a folder")
    accuracy.add_argument("--budgets", type=arg.positive_int, nargs="+", default=[192, 128, 64, 32])
    accuracy.add_argument("--methods", nargs="+", default=None,
                          help="methods and references (default: every method, GroundTruth and GroundTruth2; "
                          "GroundTruthRouted, the ground truth in ALVTS's routing, only when named)")
    accuracy.add_argument("--limit", type=arg.positive_int, default=None,
                          help="evaluate the first N held-out questions only (default: 1000)")
    accuracy.add_argument("--split", default="test", help="held-out split (default: %(default)s)")
    accuracy.add_argument("--batch", type=arg.positive_int, default=50, help="questions per forward (default: %(default)s)")
    accuracy.add_argument("--seed", type=int, default=0, help="seed of the Random baseline (default: %(default)s)")
    accuracy.add_argument("--threads", type=arg.threads, default=None, help="torch CPU threads")
    accuracy.add_argument("--json", type=arg.creatable_file, help="write the records here")
    accuracy.add_argument("--plot", type=arg.creatable_file, default="out/bench_accuracy.png",
                          help="PNG of retention (default: %(default)s)")
    accuracy.set_defaults(run=_run_bench_accuracy, check=_check_bench_accuracy, prog=accuracy.prog)


def _check_bench_speed(args: argparse.Namespace) -> None:
    """FlashAttention only where its kernels run: a CUDA device, bfloat16 or float16, the package installed."""
    if not args.attn.startswith("flash_attention"):
        return
    if not args.device.startswith("cuda"):
        raise ValueError(f"--attn {args.attn} runs on a CUDA device only; give --device cuda, or --attn sdpa on {args.device}")
    if args.dtype == "float32":
        raise ValueError(f"--attn {args.attn} computes in 16 bits; give --dtype bfloat16 (or float16), or --attn sdpa")
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    available = is_flash_attn_2_available() if args.attn == "flash_attention_2" else is_flash_attn_3_available()
    if not available:
        package = "flash-attn" if args.attn == "flash_attention_2" else "flash-attn-3 (flash_attn_interface)"
        raise ValueError(f"--attn {args.attn} needs the {package} package built for this torch; install it (see "
                         "docs/flash-attention.md) or give --attn sdpa")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_bench_speed(args: argparse.Namespace) -> int:
    from .bench.speed import markdown_table, plot, run_speed, write_json

    records, skipped = run_speed(args.shape, tuple(args.budgets), tuple(args.methods), args.layers, args.vision_layers,
                        args.dtype, args.device, args.repeats, args.new_tokens, decode_steps=2, attn=args.attn,
                        resolution=args.resolution, tied_layers=args.tied_layers,
                        prefill_only=args.prefill_only)
    print(markdown_table(records))
    tied = " (sharing one layer's weights)" if args.tied_layers else ""
    print(f"\n{args.shape}, {args.layers} decoder{tied} + {args.vision_layers} vision layers, {args.dtype}, {args.device}; "
          "overhead = prefill / oracle prefill (the same schedule, selection given for free); "
          "ideal = full FLOPs / method FLOPs without selection")
    for note in skipped:
        print(f"skipped {note}")
    print(f"wrote {plot(records, args.plot)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(records, args.json)
        print(f"wrote {args.json}")
    return 0


def _run_bench_accuracy(args: argparse.Namespace) -> int:
    import torch

    from .bench import accuracy as bench

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


def _check_bench_accuracy(args: argparse.Namespace) -> None:
    """Every budget within the visual tokens of one of the benchmark's images."""
    from .smallvlm.scenes import GRID

    visual_tokens = GRID ** 2
    too_large = [b for b in args.budgets if b > visual_tokens]
    if too_large:
        raise ValueError(f"budgets {too_large} are above the {visual_tokens} visual tokens of an image; "
                         f"give budgets from 1 to {visual_tokens}")


def _add_calibrate(commands) -> None:
    from .calibrate import DEFAULT_RANK, DTYPES

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
    calibrate.add_argument("--out", type=arg.file_in_existing_folder, required=True,
                           help="where to write the selectors (.safetensors), in an existing folder")
    calibrate.add_argument("--rank", type=arg.positive_int, default=None,
                           help=f"selector rank, at most the model's hidden size (default: {DEFAULT_RANK}, or the "
                           "hidden size if smaller)")
    calibrate.add_argument("--steps", type=arg.positive_int, default=200, help="Adam steps per layer (default: %(default)s)")
    calibrate.add_argument("--lr", type=arg.positive_float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    calibrate.add_argument("--start-layer", type=arg.layer_index, default=1,
                           help="first layer with a selector, below the model's layer count (default: %(default)s)")
    calibrate.add_argument("--ratio", type=arg.fraction, default=64 / 576,
                           help="budget fraction in (0, 1] the top-k overlap is measured at (default: 64/576)")
    calibrate.add_argument("--dtype", default="float32", choices=DTYPES,
                           help="dtype the model is loaded and calibrated in (default: %(default)s)")
    calibrate.set_defaults(run=_run_calibrate, check=_check_calibrate, prog=calibrate.prog)


def _check_calibrate(args: argparse.Namespace) -> None:
    """The model folder, the start layer and rank against its config, and every image (no weights loaded)."""
    from .calibrate import check_model_folder, check_settings, decoder_size, readable_images, resolve_rank

    check_model_folder(args.model)
    size = decoder_size(args.model)  # None: calibrate_alvts checks after loading, before fitting
    if size is not None:
        layers, hidden_size = size
        check_settings(layers, hidden_size, resolve_rank(args.rank, hidden_size), args.start_layer, args.ratio)
    readable_images(args.images)


def _run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate_alvts, fidelity_table, load_model_and_samples

    model, samples = load_model_and_samples(args.model, args.images, args.prompt, dtype=args.dtype)
    selectors = calibrate_alvts(model, samples, rank=args.rank, steps=args.steps, lr=args.lr,
                                start_layer=args.start_layer, ratio=args.ratio, progress=True)
    print(fidelity_table(selectors))
    selectors.save(args.out)
    rank = next(s.query.a.shape[1] for s in selectors.layers if s is not None)
    print(f"wrote {args.out}: selectors of rank {rank} for {len(selectors.layers)} layers of {args.model} "
          f"({args.dtype})")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from .bench import demo

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    demo.run_demo(args.model or demo.CHECKPOINT, budget=args.budget, scenes=args.scenes, out=args.out, seed=args.seed)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tokensieve` console script; returns the exit status."""
    args = build_parser().parse_args(argv)  # a bad value: one line on stderr, SystemExit(2)
    try:
        args.check(args)
        return args.run(args)
    except ValueError as error:
        print(f"{args.prog}: error: {arg.one_line(str(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
