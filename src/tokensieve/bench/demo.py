"""`make demo` / `tokensieve demo`: the shipped small VLM answers questions about new scenes,
uncompressed and with every method at one budget, with the time each took and a picture of the
visual tokens each kept.

The model is the project's own (tokensieve/smallvlm/checkpoint, trained by `python -m
tokensieve.smallvlm.train`), so the answers are real: a method that drops the tokens a question
needs gets it wrong.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import tokensieve as ts

from ..smallvlm import model as M
from ..smallvlm import scenes as S
from ..viz import kept_overlay_rows
from .accuracy import CHECKPOINT, METHOD_NAMES, candidates, load_checkpoint

DEFAULT_OUT = "out/demo_kept_tokens.png"
FIRST_DEMO_INDEX = 500_000  # demo scenes come from the test split, far from the benchmark's first 1000


@dataclass
class Run:
    """One method's answers to the demo questions, its prefill time and the first scene's kept tokens."""

    label: str
    setting: str
    answers: list[str]
    seconds: float
    tokens_per_layer: float
    kept: dict | None


@dataclass(frozen=True)
class Asked:
    """A demo question about a scene: the scene's number, its image, the question."""

    scene: int
    image: object
    question: S.Question


DEMO_KINDS = (("count", "small"), ("exists", "quadrant"), ("count", "color"))  # per scene, in turn


def demo_questions(scenes: int, seed: int) -> list[Asked]:
    """`scenes` new scenes of the test split, two questions of different kinds about each.

    The kinds take turns through DEMO_KINDS, so counting and existence, where methods differ most,
    are always asked; a kind a scene cannot answer (no shape appears once) gives way to the next kind.
    """
    asked = []
    for i in range(scenes):
        rng = np.random.default_rng(S.split_seed("test", FIRST_DEMO_INDEX + 1000 * seed + i))
        scene = S.random_scene(rng)
        image, _ = S.render(scene)
        wanted = DEMO_KINDS[i % len(DEMO_KINDS)]
        kinds = list(wanted) + [k for k in S.KINDS if k not in wanted]
        questions = [q for q in (S.ask(scene, kind, rng) for kind in kinds) if q is not None][:2]
        asked += [Asked(i + 1, image, q) for q in questions]
    return asked


@torch.no_grad()
def answer_with(model, processor, inputs: dict, method, label: str, setting: str) -> Run:
    """Answers (one word each) of the model compressed by `method` (None: uncompressed); the second of
    two identical prefills is timed (the first warms the method's code paths up)."""
    handle = ts.compress(model, method) if method is not None else None
    try:
        model(**inputs, logits_to_keep=1)
        start = time.perf_counter()
        ids = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1)
        seconds = time.perf_counter() - start
        if handle is None:
            tokens, kept = float(model.config.image_seq_length), None
        else:
            tokens, kept = float(handle.stats.mean_tokens_per_layer.mean()), handle.stats.kept[0]
    finally:
        if handle is not None:
            handle.remove()
    return Run(label, setting, processor.tokenizer.convert_ids_to_tokens(ids.tolist()), seconds, tokens, kept)


def method_runs(model, processor, inputs: dict, budget: int, methods, selectors) -> tuple[list[Run], list[str]]:
    """The uncompressed model, then each method at the budget (or its fallback where out of reach);
    also a note per method that cannot reach the budget at all."""
    layers = model.config.text_config.num_hidden_layers
    runs, skipped = [answer_with(model, processor, inputs, None, "full", "uncompressed")], []
    for name in methods:
        reason = ""
        for method, setting in candidates(name, budget, layers, selectors, seed=0):
            try:
                runs.append(answer_with(model, processor, inputs, method, f"{name} {budget}", setting))
                break
            except ValueError as error:  # out of reach with this setting; nothing was touched
                reason = str(error)
        else:
            skipped.append(f"{name}: {reason}")
    return runs, skipped


def answers_table(asked: list[Asked], runs: list[Run]) -> str:
    """A row per question: the question, the right answer, each run's answer (marked when wrong)."""
    head = ["scene", "question", "truth"] + [r.label for r in runs]
    rows = [head]
    truth = [a.question.answer for a in asked]
    for i, a in enumerate(asked):
        cells = [str(a.scene), a.question.text, truth[i]]
        cells += [x if x == truth[i] else f"{x} (x)" for x in (r.answers[i] for r in runs)]
        rows.append(cells)
    footer = ["", "right / prefill ms / tokens per layer", ""]
    footer += [f"{sum(x == t for x, t in zip(r.answers, truth))}/{len(asked)} "
               f"{1000 * r.seconds:.0f} {r.tokens_per_layer:.0f}" for r in runs]
    rows.append(footer)
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def run_demo(model_dir: str | Path = CHECKPOINT, budget: int = 64, scenes: int = 3, methods=METHOD_NAMES,
             out: str | Path = DEFAULT_OUT, seed: int = 0, echo=print) -> list[Run]:
    """Loads the small VLM, asks the demo questions uncompressed and with each method, prints the
    answers and times, and writes the picture of the first scene's kept tokens (a row per method)."""
    if budget < 1 or budget > 576:
        raise ValueError(f"budget must be between 1 and 576 visual tokens per layer, got {budget}")
    model, processor, selectors = load_checkpoint(model_dir)
    asked = demo_questions(scenes, seed)
    inputs = dict(processor(images=[a.image for a in asked], text=[M.prompt(a.question.text) for a in asked],
                            return_tensors="pt", padding=True))
    runs, skipped = method_runs(model, processor, inputs, budget, methods, selectors)
    echo(f"tokensieve demo: the shipped small VLM ({model_dir}), {len(asked)} questions about {scenes} new scenes, "
         f"each method at a budget of {budget} visual tokens per decoder layer (of 576)\n")
    echo(answers_table(asked, runs))
    for r in runs[1:]:
        if r.setting != "defaults":
            echo(f"  {r.label}: {r.setting}")
    for note in skipped:
        echo(f"  skipped {note}")
    rows = [(r.label, r.kept) for r in runs if r.kept is not None]
    path = kept_overlay_rows(asked[0].image, (S.GRID, S.GRID), rows, out,
                             title=f"scene 1: '{asked[0].question.text}'")
    echo(f"\nwrote {path}: the visual tokens each method kept on scene 1, per stage or layer")
    return runs
