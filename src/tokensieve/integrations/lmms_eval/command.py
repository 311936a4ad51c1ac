"""The `tokensieve eval` subcommand: its arguments, their checks (before any run) and its output."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from ... import cli_arguments as arg


def add_eval_command(commands) -> None:
    """Adds `tokensieve eval` to the command's subparsers."""
    run = commands.add_parser(
        "eval", help="retention on lmms-eval tasks: the uncompressed model and every method x budget",
        description="Runs lmms-eval (needs tokensieve[lmms-eval]) on the tasks for the uncompressed model and every "
        "method at every budget, one lmms-eval run each, and prints and plots each task's retention (its first "
        "metric as a % of the uncompressed model's) with the mean visual tokens per decoder layer and the prefill "
        "FLOPs. The local task tokensieve_scenes (the small VLM's held-out questions) is always on the include path.",
    )
    run.add_argument("--model", required=True, help="checkpoint folder (save_pretrained) or hub id")
    run.add_argument("--tasks", type=task_list, required=True, help="lmms-eval task names, comma-separated")
    run.add_argument("--methods", nargs="+", default=["apet", "alvts"], help="registry names (default: %(default)s)")
    amounts = run.add_mutually_exclusive_group()
    amounts.add_argument("--budgets", type=arg.positive_int, nargs="+", default=[192, 128, 64],
                         help="mean visual tokens per decoder layer (default: %(default)s)")
    amounts.add_argument("--ratios", type=arg.fraction, nargs="+", default=[],
                         help="instead of budgets: the fraction of each image's visual tokens KEPT, e.g. 0.2")
    run.add_argument("--method-args", nargs="+", default=[], metavar="METHOD:FIELD=VALUE,...",
                     help="a method's own fields, e.g. alvts:selectors=sel.safetensors,start_layer=0")
    run.add_argument("--limit", type=arg.positive_int, default=None, help="the first N documents of each task only")
    run.add_argument("--num-processes", type=arg.positive_int, default=1,
                     help="data-parallel processes (accelerate launch on GPUs, torchrun on a CPU) (default: 1)")
    run.add_argument("--batch-size", type=arg.positive_int, default=1, help="prompts per generate (default: 1)")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    run.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    run.add_argument("--max-frames", type=arg.positive_int, default=None,
                     help="frames sampled from each video of a video task (model argument max_frames_num; default 8)")
    run.add_argument("--include-path", nargs="+", default=[], help="more task folders for lmms-eval")
    run.add_argument("--out", type=folder_to_write, default="out/eval", help="runs' folders (default: %(default)s)")
    run.add_argument("--json", type=arg.creatable_file, default=None, help="records (default: OUT/eval.json)")
    run.add_argument("--plot", type=arg.creatable_file, default=None, help="PNG of retention (default: OUT/retention.png)")
    run.set_defaults(run=run_command, check=check_command, prog=run.prog)


def task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise arg.Invalid(f"expected task names separated by commas, e.g. pope,gqa; got {text!r}")
    return tasks


def folder_to_write(text: str) -> str:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise arg.Invalid(f"{text} is a file; give a folder for the runs' outputs")
    return text


def check_command(args: argparse.Namespace) -> None:
    """lmms-eval installed, every run's model arguments valid (checkpoint, model type, methods, fields)."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise ValueError('lmms-eval is not installed; pip install "tokensieve[lmms-eval]"')
    check_torchvision()
    from .evaluate import parse_method_args, plan_runs

    common = {"dtype": args.dtype, "attn_implementation": args.attn}
    if args.max_frames is not None:
        common["max_frames_num"] = str(args.max_frames)
    args.runs = plan_runs(args.model, args.methods, args.budgets, parse_method_args(args.method_args), common,
                          Path(args.out), args.ratios)


def check_torchvision() -> None:
    """lmms-eval imports torchvision when it is installed; PyPI's build fails beside a CPU build of torch."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except (RuntimeError, ImportError) as error:
        raise ValueError(f"torchvision is installed but does not import beside this torch ({error}); remove it "
                         "(pip uninstall torchvision) or install the build that matches torch") from None


def run_command(args: argparse.Namespace) -> int:
    import sys

    from .evaluate import markdown_table, plot, run_eval, write_json

    try:
        records = run_eval(args.runs, args.tasks, args.include_path, args.limit, args.batch_size, args.num_processes)
    except RuntimeError as error:  # a run wrote no results: its log's end says why
        print(f"{args.prog}: error: {error}", file=sys.stderr)
        return 1
    print(markdown_table(records))
    print("\nretention = score / the uncompressed model's on the same task, % (the score in brackets: the task's first "
          "metric); visual tokens/layer and prefill GFLOPs (decoder layers and selection, vision tower excluded) are "
          "means per prompt over the tasks")
    print(f"wrote {write_json(records, args.json or Path(args.out) / 'eval.json')}")
    print(f"wrote {plot(records, args.plot or Path(args.out) / 'retention.png')}")
    return 0
