"""`tokensieve bench accuracy`: every method at every budget on the shipped small VLM.

The small VLM (tokensieve.smallvlm, trained by the project) answers one-word questions about synthetic scenes;
each method compresses its 576 visual tokens to a budget (mean visual tokens per decoder layer) and
the held-out exact-match accuracy is compared with the uncompressed model's (retention), overall and
per question kind, beside the mean visual tokens each decoder layer processed and the analytic
prefill FLOPs of the run. "GroundTruth" is a reference, not a method: it keeps the patches the
scene generator knows hold objects, which shows how much a selection that knows where every object
is keeps ("GroundTruth2": the same in ApET's two-stage shape; "GroundTruthRouted", run only when
named: the same in ALVTS's per-layer routing).

    tokensieve bench accuracy [--model local|context|DIR] [--methods ...] [--budgets 192 128 64 32] [--limit N]
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import tokensieve as ts

from .. import registry
from ..flops import Widths, decoder_layer_flops
from ..smallvlm import CHECKPOINT, CHECKPOINTS, checkpoint_folder
from ..smallvlm import model as M
from ..smallvlm import scenes as S
from ..smallvlm.calibrate import SELECTORS
from ..smallvlm.ground_truth import GroundTruthObjects, GroundTruthRouted, object_first_order
from ..viz import agg_figure, save_figure
from .shapes import vit_flops

METHOD_NAMES = registry.method_names()
BENCH_NAMES = METHOD_NAMES + ("GroundTruth", "GroundTruth2")  # the methods and the ground-truth references
NAMED_ONLY = ("GroundTruthRouted",)  # references run only when asked for by name
BUDGETS = (192, 128, 64, 32)


@dataclass
class Record:
    """One run: a method at a budget (method "full": the uncompressed model, budget None)."""

    method: str
    budget: int | None
    setting: str
    accuracy: float
    retention: float
    mean_tokens_per_layer: float
    prefill_flops: float
    seconds: float
    samples: int
    accuracy_by_kind: dict = field(default_factory=dict)
    retention_by_kind: dict = field(default_factory=dict)


@dataclass
class Batch:
    """Processed inputs of a chunk of samples, the token id of each right answer, each question's kind."""

    inputs: dict
    answer_ids: torch.Tensor
    kinds: list[str]


def load_checkpoint(path: str | Path = CHECKPOINT):
    """(model, processor, selectors path or None) of a saved small VLM (a folder or a short name in
    CHECKPOINTS); ValueError if it is missing."""
    path = checkpoint_folder(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"no small VLM at {path}: give --model {' or '.join(CHECKPOINTS)} or a folder written by "
                         "`python -m tokensieve.smallvlm.train`")
    model, processor = M.load(str(path))
    selectors = path / SELECTORS
    return model, processor, selectors if selectors.is_file() else None


def prepare(processor, samples: list[S.Sample], batch_size: int) -> list[Batch]:
    """Processes the samples once (left padding) so every run reads the same tensors."""
    batches = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        inputs = processor(images=[s.image for s in chunk], text=[M.prompt(s.question) for s in chunk],
                           return_tensors="pt", padding=True)
        answer_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids([s.answer for s in chunk]))
        batches.append(Batch(dict(inputs), answer_ids, [s.kind for s in chunk]))
    return batches


def depth_scaled_layer(num_layers: int) -> int:
    """FastV's and DART's K = 2 of LLaVA-1.5-7B's 32 layers, at the same depth fraction (at least 1)."""
    return max(1, round(2 * num_layers / 32))


def bench_name(name: str) -> str:
    """A method or reference name in any case -> the benchmark's spelling; ValueError naming them all."""
    for known in BENCH_NAMES + NAMED_ONLY:
        if known.lower() == str(name).lower():
            return known
    raise ValueError(f"unknown method {name!r}; choose among {', '.join(BENCH_NAMES + NAMED_ONLY)}")


def candidates(name: str, budget: int, num_layers: int, selectors: Path | None, seed: int,
               orders: tuple[torch.Tensor, ...] = ()) -> list[tuple[object, str]]:
    """The method at this budget, then fallbacks for budgets its schedule cannot reach: (method, setting).

    `orders`: each sample's `object_first_order`, for the ground-truth references."""
    k = depth_scaled_layer(num_layers)
    if name == "GroundTruthRouted":
        return [(GroundTruthRouted(budget, orders, start), f"reference: object patches first, ALVTS's routing from layer {start}")
                for start in (1, 0)]
    if name.startswith("GroundTruth"):
        two_stage = name == "GroundTruth2"
        where = "ApET's two-stage shape" if two_stage else "before layer 0"
        return [(GroundTruthObjects(budget, orders, two_stage), f"reference: object patches first, {where}")]
    if name == "ALVTS":
        return [(ts.ALVTS(budget=budget, selectors=selectors, start_layer=start), f"start_layer={start}"
                 + ("" if selectors else ", SVD selectors"))
                for start in (1, 0)]
    if name == "FastV":
        return [(ts.FastV(budget=budget, layer=k), f"layer={k}"),
                (ts.FastV(kept=budget, layer=k), f"kept={budget} after layer {k} (a mean of {budget} is out of reach)")]
    if name == "DART":
        return [(ts.DART(budget=budget, layer=k), f"layer={k}")]
    if name == "Random":
        return [(ts.Random(budget=budget, seed=seed), f"seed={seed}")]
    return [(registry.method(name, budget=budget), "defaults")]


def vision_flops(config) -> int:
    """Analytic FLOPs of the vision tower (all layers, CLS included) and the projector, per image."""
    v, t = config.vision_config, config.text_config
    tokens = (v.image_size // v.patch_size) ** 2
    projector = 2 * tokens * (v.hidden_size * t.hidden_size + t.hidden_size * t.hidden_size)
    return vit_flops(tokens + 1, v.hidden_size, v.intermediate_size, v.num_hidden_layers) + projector


def full_decoder_flops(config, batch: Batch) -> int:
    """Decoder prefill FLOPs of the uncompressed model over a batch (every non-padding row, every layer)."""
    widths = Widths.of(config.text_config)
    rows = batch.inputs["attention_mask"].sum(1).tolist()
    return config.text_config.num_hidden_layers * sum(decoder_layer_flops(widths, int(r)) for r in rows)


@torch.no_grad()
def run_method(model, batches: list[Batch], method) -> tuple[list[bool], list[str], float, float, float]:
    """-> (right per sample, kinds, mean visual tokens per layer, prefill FLOPs per sample, seconds)."""
    right, kinds, tokens, flops = [], [], 0.0, 0.0
    handle = ts.compress(model, method) if method is not None else None
    start = time.perf_counter()
    try:
        for batch in batches:
            predicted = model(**batch.inputs, logits_to_keep=1).logits[:, -1].argmax(-1)
            right += (predicted == batch.answer_ids).tolist()
            kinds += batch.kinds
            if handle is None:
                tokens += float(model.config.image_seq_length) * len(batch.kinds)
                flops += full_decoder_flops(model.config, batch)
            else:
                tokens += float(handle.stats.mean_tokens_per_layer.sum())
                flops += handle.stats.decoder_flops + handle.stats.selection_flops
    finally:
        if handle is not None:
            handle.remove()
    seconds = time.perf_counter() - start
    n = len(right)
    return right, kinds, tokens / n, flops / n + vision_flops(model.config), seconds


def by_kind(right: list[bool], kinds: list[str]) -> dict[str, float]:
    """Accuracy per question kind (kinds in scenes.KINDS order)."""
    return {k: sum(r for r, q in zip(right, kinds) if q == k) / kinds.count(k) for k in S.KINDS if k in kinds}


def record(method: str, budget, setting: str, outcome, reference: Record | None) -> Record:
    """A Record from run_method's outcome; retention against the reference (the full model's record)."""
    right, kinds, tokens, flops, seconds = outcome
    accuracy, kind_accuracy = sum(right) / len(right), by_kind(right, kinds)
    if reference is None:
        retention, kind_retention = 1.0, {k: 1.0 for k in kind_accuracy}
    else:
        retention = accuracy / max(reference.accuracy, 1e-9)
        kind_retention = {k: v / max(reference.accuracy_by_kind[k], 1e-9) for k, v in kind_accuracy.items()}
    return Record(method, budget, setting, accuracy, retention, tokens, flops, seconds, len(right),
                  kind_accuracy, kind_retention)


def run_accuracy(model_dir: str | Path = CHECKPOINT, methods=BENCH_NAMES, budgets=BUDGETS, limit: int | None = None,
                 split: str = "test", batch_size: int = 50, seed: int = 0,
                 progress: bool = True) -> tuple[list[Record], list[str]]:
    """The full model, then every method at every budget on the first `limit` samples of the split.

    Returns the records (the first is method "full") and a note per method/budget that could not run.
    """
    methods = tuple(bench_name(m) for m in methods)
    if split not in S.SPLITS:
        raise ValueError(f"unknown split {split!r}; choose among {', '.join(S.SPLITS)}")
    model, processor, selectors = load_checkpoint(model_dir)
    samples = S.split_samples(split, limit or 1000)
    batches = prepare(processor, samples, batch_size)
    layers = model.config.text_config.num_hidden_layers
    orders = tuple(object_first_order(s) for s in samples) if any(m.startswith("GroundTruth") for m in methods) else ()
    full = record("full", None, "uncompressed", run_method(model, batches, None), None)
    records, skipped = [full], []
    jobs = [(m, b) for b in budgets for m in methods]
    for name, budget in tqdm(jobs, desc="bench accuracy", disable=not progress):
        outcome, reasons = None, []
        for method, setting in candidates(name, budget, layers, selectors, seed, orders):
            try:
                outcome = run_method(model, batches, method)
                break
            except ValueError as error:  # the schedule cannot reach this budget; nothing was touched
                reasons.append(str(error))
        if outcome is None:
            skipped.append(f"{name} {budget}: {reasons[-1]}")
            continue
        records.append(record(name, budget, setting, outcome, full))
    return records, skipped


def markdown_table(records: list[Record]) -> str:
    """Accuracy, retention overall and per kind, tokens per layer and prefill FLOPs of each run."""
    kinds = list(records[0].accuracy_by_kind)
    head = ("| method | budget | tokens/layer | prefill MFLOPs | accuracy | retention | "
            + " | ".join(kinds) + " | setting |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        per_kind = " | ".join(f"{100 * r.retention_by_kind.get(k, 0):.1f}" for k in kinds)
        lines.append(f"| {r.method} | {r.budget or 576} | {r.mean_tokens_per_layer:.1f} | {r.prefill_flops / 1e6:.0f} | "
                     f"{100 * r.accuracy:.1f} | {100 * r.retention:.1f} | {per_kind} | {r.setting} |")
    return "\n".join(lines)


def plot(records: list[Record], path: str | Path) -> Path:
    """Retention (%) against mean visual tokens per layer and against prefill FLOPs, a line per method."""
    full = records[0]
    fig = agg_figure(12, 4.6)
    axes = fig.subplots(1, 2)
    methods = list(dict.fromkeys(r.method for r in records[1:]))
    for name in methods:
        runs = sorted((r for r in records if r.method == name), key=lambda r: r.mean_tokens_per_layer)
        style = dict(marker="o", linewidth=2.4 if name in ("ApET", "ALVTS") else 1.2, label=name)
        if name.startswith("GroundTruth"):
            style.update(color="black", linestyle="--" if name == "GroundTruth" else ":", marker="x",
                         label="ground truth (object patches)" + (", ApET's two stages" if name == "GroundTruth2" else ""))
        axes[0].plot([r.mean_tokens_per_layer for r in runs], [100 * r.retention for r in runs], **style)
        axes[1].plot([r.prefill_flops / 1e9 for r in runs], [100 * r.retention for r in runs], **style)
    for ax, label, x in ((axes[0], "mean visual tokens per decoder layer", full.mean_tokens_per_layer),
                         (axes[1], "prefill GFLOPs per question", full.prefill_flops / 1e9)):
        ax.axhline(100, color="grey", linestyle=":", linewidth=1)
        ax.plot([x], [100], marker="*", markersize=12, color="black", label="full" if ax is axes[0] else None)
        ax.set_xlabel(label)
    ticks = sorted({round(r.mean_tokens_per_layer) for r in records})
    axes[0].set_xscale("log")
    axes[0].set_xticks(ticks, [str(t) for t in ticks], minor=False)
    axes[0].set_xticks([], minor=True)
    for ax in axes:
        ax.set_ylabel("retention (% of uncompressed accuracy)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"small VLM, {full.samples} held-out questions: uncompressed accuracy {100 * full.accuracy:.1f}%")
    return save_figure(fig, path, dpi=110)


def write_json(records: list[Record], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps([asdict(r) for r in records], indent=1))
