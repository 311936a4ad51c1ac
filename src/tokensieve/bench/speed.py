"""`tokensieve bench speed`: what each method costs and saves at prefill and decode, beside its oracle.

For each method and budget, after a warm-up, with repeats and the median: prefill time, the
oracle's prefill time (the same model fed the sequence the method's schedule produced, with no
selection cost: a Replay of the kept tokens, or ALVTS's held per-layer choice), time per decoded
token, end-to-end time for N new tokens, peak memory (CUDA), KV-cache bytes after prefill, and the
analytic prefill FLOPs (vision tower + projector + decoder + selection) with the ideal speed-up they
imply. CPU absolute times are not comparable across machines: read the ratios.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

import tokensieve as ts

from .. import registry
from ..runtime.compat import CACHE_ARGUMENT
from ..viz import agg_figure, save_figure
from .shapes import build, full_prefill_flops

METHOD_NAMES = registry.method_names()


@dataclass
class Record:
    """One row of the benchmark (method "full" is the uncompressed model)."""

    method: str
    budget: int | None
    shape: str
    device: str
    dtype: str
    decoder_layers: int
    prefill_s: float
    oracle_prefill_s: float | None
    decode_s_per_token: float | None  # None: --prefill-only
    end_to_end_s: float | None
    new_tokens: int
    peak_memory_bytes: int | None
    kv_cache_bytes: int
    prefill_flops: int
    selection_flops: int
    mean_tokens_per_layer: float
    speedup: float = 1.0
    ideal_speedup: float = 1.0

    @property
    def overhead(self) -> float | None:
        return None if self.oracle_prefill_s is None else self.prefill_s / self.oracle_prefill_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls (warm up first)."""
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def prefill(model, inputs: dict):
    with torch.no_grad():
        return model(**inputs, use_cache=True, logits_to_keep=1)


def kv_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def decode_per_token(model, prefilled, steps: int, device: torch.device) -> float:
    """Median seconds of one greedy decoding step, continuing the cache of `prefilled`.

    The prompt is one unpadded row, so the step passes no attention mask (a hand-written Qwen-VL step
    given the full mask but no position ids fails inside transformers 5.24)."""
    cache = prefilled.past_key_values
    token = prefilled.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    with torch.no_grad():
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{CACHE_ARGUMENT: cache})
            _sync(device)
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    return statistics.median(times)


def end_to_end(model, inputs: dict, new_tokens: int, device: torch.device) -> float:
    """Seconds of one greedy `generate` of `new_tokens` tokens (prefill included)."""
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync(device)
    return time.perf_counter() - start


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak allocated bytes during fn on CUDA; None on the CPU (no allocator statistics there)."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device)


def make_method(name: str, budget: int, layers: int, visual_tokens: int, selectors=None):
    """The registry's method `name` at this budget (per item: an image, or one video frame).

    ALVTS starts routing at layer 1 (the paper's figure) when the other layers can still share the
    budget after layer 0 processed all `visual_tokens` (of one item), else at layer 0. It uses `selectors` when given
    (the SVD ones built once for every budget: an exact SVD of a 4096 x 4096 projection takes seconds
    on a CPU), else builds its own."""
    cls = registry.entry(name).cls
    if name == "ALVTS":
        start = 1 if visual_tokens <= budget * layers - (layers - 1) else 0
        return cls(budget=budget, start_layer=start, selectors=selectors)
    return cls(budget=budget)


def shared_selectors(model):
    """The SVD selectors ALVTS builds by default, on every decoder layer."""
    from ..models import family_for

    layers = family_for(model).parts(model).layers
    return ts.ALVTS(ratio=1.0, start_layer=0).resolve_selectors(model.config.model_type, layers)


def prefill_and_oracle_times(model, inputs: dict, method, handle, device: torch.device,
                             repeats: int) -> tuple[float, float | None]:
    """Median prefill seconds of the method and of its oracle (None where no replay exists), timed in
    alternation so that a machine whose speed drifts (a shared CPU) slows both alike.

    The oracle is the same schedule with the selection given for free: ALVTS's per-layer choice held
    from the run just before, or a `Replay` of the kept tokens of the other methods.
    """
    run = lambda: prefill(model, inputs)  # noqa: E731
    method_times, oracle_times = [], []
    if handle.schedule.routing is not None:
        with ts.compress(model, method) as routed:
            run()
            for _ in range(repeats):
                routed.hold_selection(False)
                method_times.append(seconds(run, device))
                routed.hold_selection(True)
                oracle_times.append(seconds(run, device))
        return statistics.median(method_times), statistics.median(oracle_times)
    try:
        replay = ts.Replay.from_handle(handle)
    except ValueError:
        replay = None
    for _ in range(repeats + 1):  # the first round warms both up
        with ts.compress(model, method):
            method_times.append(seconds(run, device))
        if replay is not None:
            with ts.compress(model, replay):
                oracle_times.append(seconds(run, device))
    oracle = statistics.median(oracle_times[1:]) if replay is not None else None
    return statistics.median(method_times[1:]), oracle


def measure(model, inputs: dict, method, label: str, budget, context: dict) -> Record:
    device, repeats = context["device"], context["repeats"]
    handle = ts.compress(model, method) if method is not None else None
    try:
        prefilled = prefill(model, inputs)  # warms up; the prefill is timed below
        cache_bytes = kv_bytes(prefilled.past_key_values)
        memory = decode = e2e = None
        if not context["prefill_only"]:
            memory = peak_memory(lambda: prefill(model, inputs), device)
            decode = decode_per_token(model, prefilled, context["decode_steps"], device)
            e2e = end_to_end(model, inputs, context["new_tokens"], device)
        stats = handle.stats if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
    if handle is None:
        prefill_s, oracle = timed(lambda: prefill(model, inputs), device, repeats), None
    else:
        prefill_s, oracle = prefill_and_oracle_times(model, inputs, method, handle, device, repeats)
    full_flops = context["full_flops"]
    if stats is None:
        flops, selection, mean = full_flops, 0, float(context["visual_tokens"])
    else:
        selection = stats.selection_flops
        flops = context["vision_flops"] + stats.decoder_flops + selection
        mean = float(stats.mean_tokens_per_layer[0])
    return Record(label, budget, context["shape"], str(device), context["dtype"], context["layers"], prefill_s, oracle,
                  decode, e2e, context["new_tokens"], memory, cache_bytes, flops, selection, mean,
                  ideal_speedup=full_flops / max(1, flops - selection))


def run_speed(shape_name: str = "llava-1.5-7b", budgets=(192, 128, 64), methods=("ApET", "ALVTS"), layers: int = 2,
              vision_layers: int | None = 2, dtype: str = "float32", device: str = "cpu", repeats: int = 3,
              new_tokens: int = 8, decode_steps: int = 4, attn: str = "sdpa", resolution: int = 448,
              progress: bool = True, tied_layers: bool = False,
              prefill_only: bool = False) -> tuple[list[Record], list[str]]:
    """Every method at every budget on one preset shape; the first record is the full model.
    `prefill_only` skips decoding and `generate` (their fields are None), for deep builds on a CPU.

    Returns the records and a note for each method/budget that cannot run on this shape (skipped)."""
    methods = tuple(registry.entry(m).name for m in methods)  # ValueError naming the known ones
    torch_dtype = getattr(torch, dtype)
    shape, built = build(shape_name, layers, vision_layers, torch_dtype, attn, resolution, device=device,
                         tied_layers=tied_layers)
    target = torch.device(device)
    built.model.to(target)
    inputs = {k: v.to(target) for k, v in built.inputs.items()}
    context = dict(device=target, repeats=repeats, decode_steps=decode_steps, new_tokens=new_tokens, shape=shape_name,
                   prefill_only=prefill_only,
                   dtype=dtype, layers=layers, visual_tokens=built.visual_tokens, vision_flops=built.vision_flops,
                   full_flops=full_prefill_flops(shape, built, layers))
    selectors = shared_selectors(built.model) if "ALVTS" in methods else None
    jobs = [("full", None, None)]
    jobs += [(m, b, make_method(m, b, layers, built.budget_tokens, selectors)) for b in budgets for m in methods]
    records, skipped = [], []
    for label, budget, method in tqdm(jobs, desc=f"bench speed {shape_name}", disable=not progress):
        try:
            records.append(measure(built.model, inputs, method, label, budget, context))
        except ValueError as error:  # the method cannot run this budget on this shape; nothing was touched
            skipped.append(f"{label} {budget}: {error}")
    full = records[0].prefill_s
    for record in records:
        record.speedup = full / record.prefill_s
    return records, skipped


def markdown_table(records: list[Record]) -> str:
    head = ("| method | budget | mean visual tok/layer | prefill ms | oracle ms | overhead | speed-up | ideal (FLOPs) "
            "| decode ms/tok | e2e ms | KV cache MiB | peak MiB | prefill TFLOPs | selection GFLOPs |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in records:
        oracle = "-" if r.oracle_prefill_s is None else f"{1000 * r.oracle_prefill_s:.1f}"
        overhead = "-" if r.overhead is None else f"{r.overhead:.3f}"
        peak = "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f}"
        lines.append(
            f"| {r.method} | {r.budget or '-'} | {r.mean_tokens_per_layer:.1f} | {1000 * r.prefill_s:.1f} | {oracle} "
            f"| {overhead} | {r.speedup:.2f} | {r.ideal_speedup:.2f} | {milliseconds(r.decode_s_per_token, 1)} "
            f"| {milliseconds(r.end_to_end_s, 0)} | {r.kv_cache_bytes / 2**20:.1f} | {peak} | {r.prefill_flops / 1e12:.3f} "
            f"| {r.selection_flops / 1e9:.2f} |"
        )
    return "\n".join(lines)


def milliseconds(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{1000 * value:.{digits}f}"


def plot(records: list[Record], path: str | Path) -> Path:
    """Prefill speed-up against budget per method (ideal from FLOPs dashed), and each method's overhead."""
    figure = agg_figure(10, 4)
    speed, cost = figure.subplots(1, 2)
    methods = sorted({r.method for r in records if r.method != "full"})
    for name in methods:
        rows = sorted((r for r in records if r.method == name), key=lambda r: r.budget)
        budgets = [r.budget for r in rows]
        line = speed.plot(budgets, [r.speedup for r in rows], marker="o", label=name)[0]
        speed.plot(budgets, [r.ideal_speedup for r in rows], linestyle="--", color=line.get_color(), alpha=0.6)
        with_oracle = [r for r in rows if r.overhead is not None]
        cost.plot([r.budget for r in with_oracle], [r.overhead for r in with_oracle], marker="o", label=name)
    first = records[0]
    speed.set(title=f"prefill speed-up ({first.shape}, {first.decoder_layers} layers, {first.device})",
              xlabel="budget (mean visual tokens per layer)", ylabel="x faster than full (dashed: FLOPs ideal)")
    cost.axhline(1.0, color="grey", linewidth=0.8)
    cost.set(title="selection overhead: prefill / oracle prefill", xlabel="budget", ylabel="ratio")
    for ax in (speed, cost):
        ax.invert_xaxis()
        ax.legend()
        ax.grid(alpha=0.3)
    return save_figure(figure, path, dpi=110)


def write_json(records: list[Record], path: str | Path) -> None:
    rows = [{**asdict(r), "overhead": r.overhead} for r in records]
    Path(path).write_text(json.dumps(rows, indent=2))
