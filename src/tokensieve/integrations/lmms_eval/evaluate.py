"""`tokensieve eval`: the uncompressed model and every method x budget through lmms-eval, one command.

Each setting is one run of lmms-eval's own command line (`python -m lmms_eval --model tokensieve ...`),
in a folder of its own under the output folder, with several processes through `accelerate launch`
on GPUs (or torchrun on a machine without one: accelerate's launcher starts a single process there).
Every run's results file is read back (lmms-eval exits 0 even when an evaluation fails, so a missing
file or task is an error here), beside the model's stats file; retention is each task's first metric
as a percentage of the uncompressed model's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from . import MODEL_NAME, TASKS_DIR
from . import settings as S

FULL = "full"


@dataclass(frozen=True)
class Run:
    """One lmms-eval run: the uncompressed model (method "full", budget None) or a method at a budget."""

    method: str
    budget: int | float | None  # tokens, or the fraction kept when `ratio`
    model_args: str
    folder: Path
    ratio: bool = False

    @property
    def label(self) -> str:
        return FULL if self.budget is None else f"{self.method} {amount(self.budget, self.ratio)}"


def amount(budget: int | float | None, ratio: bool) -> str:
    """64, or 'ratio 0.2'; '-' for the uncompressed model."""
    return "-" if budget is None else f"ratio {budget:g}" if ratio else str(budget)


@dataclass
class Record:
    """One task of one run."""

    method: str
    budget: int | float | None
    task: str
    metric: str
    score: float
    retention: float
    mean_visual_tokens_per_layer: float
    prefill_flops: float
    prompts: int
    results_file: str
    metrics: dict  # every metric lmms-eval reported for the task (its standard errors too)
    ratio: bool = False  # budget is the fraction of visual tokens kept


def parse_method_args(items: list[str]) -> dict[str, dict[str, str]]:
    """["alvts:start_layer=0,rank=24", ...] -> {"alvts": {"start_layer": "0", "rank": "24"}}; ValueError if malformed."""
    parsed: dict[str, dict[str, str]] = {}
    for item in items:
        name, colon, fields = item.partition(":")
        pairs = [pair.partition("=") for pair in fields.split(",") if pair]
        if not colon or not name or not pairs or any(not key or not eq for key, eq, _ in pairs):
            raise ValueError(f"--method-args {item!r} is not METHOD:FIELD=VALUE[,FIELD=VALUE...], e.g. alvts:start_layer=0")
        parsed.setdefault(name.lower(), {}).update({key: value for key, _, value in pairs})
    return parsed


def plan_runs(model: str, methods: list[str], budgets: list[int], method_args: dict[str, dict[str, str]],
              common: dict[str, str], out: Path, ratios: list[float] = ()) -> list[Run]:
    """The runs: every method at every budget (or every ratio kept, when ratios are given), each checked
    by the model's own argument checks (nothing is loaded)."""
    unused = set(method_args) - {m.lower() for m in methods}
    if unused:
        raise ValueError(f"--method-args names {', '.join(sorted(unused))}, which --methods does not run")
    base = {"pretrained": str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model,
            **common}
    runs = [make_run(base, S.UNCOMPRESSED, FULL, None, {}, out, False)]
    field, amounts = ("ratio", list(ratios)) if ratios else ("budget", list(budgets))
    for name in methods:
        display = S.method_entry(name).name
        for value in amounts:
            fields = {field: str(value), **method_args.get(name.lower(), {})}
            runs.append(make_run(base, name, display, value, fields, out, bool(ratios)))
    return runs


def make_run(base: dict, name: str, display: str, budget, fields: dict[str, str], out: Path, ratio: bool) -> Run:
    from lmms_eval.utils import handle_arg_string  # the model receives values as lmms-eval parses them

    S.resolve(base["pretrained"], name, {k: handle_arg_string(v) for k, v in fields.items()})
    folder = out / (FULL if budget is None else f"{display}_{'ratio' if ratio else ''}{budget:g}")
    values = {**base, "method": name.lower(), **fields, "stats_file": str(folder / "tokensieve_stats.json")}
    return Run(display if budget is not None else FULL, budget, ",".join(f"{k}={v}" for k, v in values.items()),
               folder, ratio)


def launcher(num_processes: int) -> list[str]:
    """One process: python -m lmms_eval. Several: accelerate launch on GPUs, torchrun on a CPU-only machine."""
    if num_processes == 1:
        return [sys.executable, "-m", "lmms_eval"]
    import torch

    if torch.cuda.is_available():
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                "-m", "lmms_eval"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), "-m", "lmms_eval"]


def command(run: Run, tasks: list[str], include_paths: list[str], limit: int | None, batch_size: int,
            num_processes: int) -> list[str]:
    """lmms-eval's command line for one run."""
    argv = launcher(num_processes) + ["--model", MODEL_NAME, "--model_args", run.model_args, "--tasks", ",".join(tasks),
                                      "--batch_size", str(batch_size), "--output_path", str(run.folder)]
    for path in [str(TASKS_DIR), *include_paths]:
        argv += ["--include_path", path]
    if limit is not None:
        argv += ["--limit", str(limit)]
    return argv


def execute(run: Run, argv: list[str]) -> dict:
    """Runs lmms-eval, output to the run's lmms_eval.log; -> its results JSON. RuntimeError if it failed."""
    run.folder.mkdir(parents=True, exist_ok=True)
    log = run.folder / "lmms_eval.log"
    with open(log, "w") as stream:
        done = subprocess.run(argv, stdout=stream, stderr=subprocess.STDOUT, env=dict(os.environ))
    found = sorted(run.folder.rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if done.returncode != 0 or not found:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"lmms-eval run {run.label} wrote no results (exit status {done.returncode}); "
                           f"see {log}:\n{tail}")
    results = json.loads(found[-1].read_text())
    results["results_file"] = str(found[-1])
    return results


def first_metric(task_results: dict) -> tuple[str, float]:
    """(name, value) of a task's first numeric metric that is not a standard error."""
    for key, value in task_results.items():
        if "stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return key.split(",")[0], float(value)
    raise RuntimeError(f"no metric in {task_results}")


def records_of(run: Run, results: dict, tasks: list[str]) -> list[Record]:
    stats = json.loads((run.folder / "tokensieve_stats.json").read_text())["tasks"]
    records = []
    for task in tasks:
        if task not in results.get("results", {}) or task not in stats:
            raise RuntimeError(f"lmms-eval run {run.label} has no results for task {task} ({results['results_file']}); "
                               f"see {run.folder / 'lmms_eval.log'}")
        metric, score = first_metric(results["results"][task])
        records.append(Record(run.method, run.budget, task, metric, score, 1.0, stats[task]["mean_visual_tokens_per_layer"],
                              stats[task]["prefill_flops"], stats[task]["prompts"], results["results_file"],
                              results["results"][task], run.ratio))
    return records


def with_retention(records: list[Record]) -> list[Record]:
    """Each record's retention: its score over the uncompressed model's on the same task."""
    full = {r.task: r.score for r in records if r.method == FULL}
    for r in records:
        r.retention = r.score / full[r.task] if full[r.task] else float("nan")
    return records


def run_eval(runs: list[Run], tasks: list[str], include_paths: list[str], limit: int | None, batch_size: int,
             num_processes: int, progress=print) -> list[Record]:
    records: list[Record] = []
    for i, run in enumerate(runs, 1):
        argv = command(run, tasks, include_paths, limit, batch_size, num_processes)
        progress(f"[{i}/{len(runs)}] {run.label}: {' '.join(argv)}")
        records += records_of(run, execute(run, argv), tasks)
    return with_retention(records)


def markdown_table(records: list[Record]) -> str:
    """A row per run: each task's retention (its score), mean retention, visual tokens per layer, FLOPs."""
    tasks = list(dict.fromkeys(r.task for r in records))
    runs = list(dict.fromkeys((r.method, r.budget, r.ratio) for r in records))
    head = "| method | budget | " + " | ".join(tasks) + " | mean retention | visual tokens/layer | prefill GFLOPs |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method, budget, ratio in runs:
        mine = [r for r in records if (r.method, r.budget, r.ratio) == (method, budget, ratio)]
        cells = " | ".join(f"{100 * r.retention:.1f} ({r.score:.4g})" for r in mine)
        mean = sum(r.retention for r in mine) / len(mine)
        tokens = sum(r.mean_visual_tokens_per_layer for r in mine) / len(mine)
        flops = sum(r.prefill_flops for r in mine) / len(mine)
        lines.append(f"| {method} | {amount(budget, ratio)} | {cells} | {100 * mean:.1f} | {tokens:.1f} | {flops / 1e9:.3f} |")
    return "\n".join(lines)


def plot(records: list[Record], path: str | Path) -> Path:
    """Retention against visual tokens per layer and against prefill FLOPs: a line per method and task."""
    from ...viz import agg_figure, save_figure

    fig = agg_figure(12, 4.6)
    axes = fig.subplots(1, 2)
    for method in dict.fromkeys(r.method for r in records if r.method != FULL):
        for task in dict.fromkeys(r.task for r in records):
            mine = sorted((r for r in records if (r.method, r.task) == (method, task)),
                          key=lambda r: r.mean_visual_tokens_per_layer)
            for ax, x in ((axes[0], [r.mean_visual_tokens_per_layer for r in mine]),
                          (axes[1], [r.prefill_flops / 1e9 for r in mine])):
                ax.plot(x, [100 * r.retention for r in mine], marker="o", label=f"{method}, {task}")
    for full in (r for r in records if r.method == FULL):
        axes[0].plot([full.mean_visual_tokens_per_layer], [100], marker="*", markersize=12, color="black")
        axes[1].plot([full.prefill_flops / 1e9], [100], marker="*", markersize=12, color="black")
    for ax, label in ((axes[0], "mean visual tokens per decoder layer"), (axes[1], "prefill GFLOPs per prompt")):
        ax.axhline(100, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("retention (% of the uncompressed score)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("lmms-eval: retention per task (star: uncompressed)")
    return save_figure(fig, path, dpi=110)


def write_json(records: list[Record], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in records], indent=1))
    return path
