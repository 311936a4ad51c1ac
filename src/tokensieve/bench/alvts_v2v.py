"""ALVTS's two readings of the V2V mean on a shipped small VLM: accuracy and where the kept tokens lie.

    python -m tokensieve.bench.alvts_v2v [--model local|context|DIR] [--budget 64] [--limit 400]
        [--plot out/alvts_v2v.png]

For `v2v_rows` "all" (the default: the mean divides by all N image rows) and "attending" (by the rows
the causal mask lets attend to the token), on the first `limit` held-out questions: accuracy and
retention against the uncompressed model, the share of the tokens each routed layer kept that lie in
the first two rows of the 24 x 24 grid (a uniform choice puts 48 / 576 = 8.3% there), the share of
the question's evidence patches each layer kept, and a picture per layer of how often each patch was
kept. Beside them, what the uncompressed model reads: per layer, the share of the answer position's
attention on the image, on the evidence patches and on the first two rows. docs/methods.md, "The ALVTS
score".
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import numpy as np
import torch

import tokensieve as ts

from ..smallvlm import checkpoint_folder
from ..smallvlm import model as M
from ..smallvlm import scenes as S
from ..viz import agg_figure, save_figure
from .accuracy import candidates, load_checkpoint, prepare, run_method

FIRST_ROWS = 2 * S.GRID  # patches in the first two rows of the grid


@dataclass
class Reading:
    """One reading of the V2V mean: accuracy, and per routed layer where the kept tokens lie."""

    v2v_rows: str
    setting: str
    accuracy: float
    first_rows_share: np.ndarray  # (L,) share of each layer's kept tokens in the first two grid rows (nan: unrouted)
    evidence_kept: np.ndarray  # (L,) share of the questions' evidence patches each layer kept
    kept_counts: np.ndarray  # (L, 576) how many questions kept each patch at each layer


@torch.no_grad()
def kept_per_layer(model, batches, method, num_layers: int) -> tuple[list[bool], np.ndarray]:
    """-> (right per question, kept (Q, L, 576) bool): the patches each layer processed (all of them
    at a layer that routes none)."""
    right, masks = [], []
    for batch in batches:
        with ts.compress(model, method) as handle:
            predicted = model(**batch.inputs, logits_to_keep=1).logits[:, -1].argmax(-1)
            kept = handle.stats.kept
        right += (predicted == batch.answer_ids).tolist()
        for item in kept:
            mask = np.ones((num_layers, S.GRID ** 2), bool)
            for layer in range(num_layers):
                chosen = item.get(f"layer{layer}")
                if chosen is not None:
                    mask[layer] = False
                    mask[layer, chosen.cpu().numpy()] = True
            masks.append(mask)
    return right, np.stack(masks)


def evidence_masks(samples: list[S.Sample]) -> np.ndarray:
    """(Q, 576) bool: each question's evidence patches (its objects' patches, or their centres for counts)."""
    out = np.zeros((len(samples), S.GRID ** 2), bool)
    for n, s in enumerate(samples):
        question = S.Question(s.question, s.answer, s.kind, s.evidence, s.anchors)
        out[n, S.evidence_patches(s.scene, s.labels, question)] = True
    return out


@dataclass
class Reads:
    """Per decoder layer (L,): the share of the answer position's attention (mean over heads and questions)
    on the image, on the question's evidence patches, and on the first two grid rows."""

    image: np.ndarray
    evidence: np.ndarray
    first_rows: np.ndarray


@torch.no_grad()
def answer_attention(model, batches, evidence: np.ndarray) -> Reads:
    """What the uncompressed model's answer position (the last row) attends to at each layer.

    Args:
        model: the small VLM with eager attention (the only kernel that returns its weights).
        batches: prepared batches (left padding: the answer position is the last row of every row).
        evidence: (Q, 576) bool, each question's evidence patches, in the batches' order.
    """
    shares, n = [], 0
    for batch in batches:
        attentions = model(**batch.inputs, output_attentions=True).attentions  # L x (B, H, S, S)
        answer = torch.stack([a[:, :, -1].mean(1) for a in attentions], 1)  # (B, L, S)
        image = batch.inputs["input_ids"] == model.config.image_token_id  # (B, S), 576 per row
        on_image = answer[image[:, None, :].expand_as(answer)].view(*answer.shape[:2], -1)  # (B, L, 576)
        marks = torch.from_numpy(evidence[n:n + len(on_image)])[:, None, :]
        shares.append(torch.stack([on_image.sum(-1), (on_image * marks).sum(-1), on_image[..., :FIRST_ROWS].sum(-1)], -1))
        n += len(on_image)
    mean = torch.cat(shares).mean(0).numpy()  # (L, 3)
    return Reads(mean[:, 0], mean[:, 1], mean[:, 2])


def measure(model_dir, budget: int = 64, limit: int = 400, batch_size: int = 50) -> tuple[float, list[Reading], Reads]:
    """The uncompressed accuracy, one Reading per value of ALVTS's v2v_rows (ALVTS set as the accuracy
    benchmark sets it: start_layer 1, or 0 where a mean of `budget` is out of reach from layer 1) and
    what the uncompressed model's answer position reads."""
    model, processor, selectors = load_checkpoint(model_dir)
    samples = S.split_samples("test", limit)
    batches = prepare(processor, samples, batch_size)
    num_layers = model.config.text_config.num_hidden_layers
    full = run_method(model, batches, None)[0]
    evidence = evidence_masks(samples)
    readings = []
    for rows in ("all", "attending"):
        for method, setting in candidates("ALVTS", budget, num_layers, selectors, seed=0):
            try:
                right, kept = kept_per_layer(model, batches, replace(method, v2v_rows=rows), num_layers)
                break
            except ValueError:  # out of reach from this start layer; nothing was touched
                continue
        else:
            raise ValueError(f"ALVTS cannot reach a mean of {budget} visual tokens per layer on this model")
        routed = kept.sum(-1) < kept.shape[-1]  # (Q, L): layers where a selection happened
        first = np.where(routed.any(0), kept[..., :FIRST_ROWS].sum((0, 2)) / np.maximum(kept.sum((0, 2)), 1), np.nan)
        has = evidence.any(1)
        hit = (kept[has] & evidence[has, None, :]).sum((0, 2)) / evidence[has].sum()
        readings.append(Reading(rows, setting, float(np.mean(right)), first, hit, kept.sum(0)))
    eager, _ = M.load(str(checkpoint_folder(model_dir)), attn_implementation="eager")
    return float(np.mean(full)), readings, answer_attention(eager, batches, evidence)


def report(full: float, readings: list[Reading], reads: Reads) -> str:
    percent = lambda values: " ".join(f"{100 * x:.0f}" for x in values)  # noqa: E731
    lines = [f"uncompressed accuracy {100 * full:.1f}%",
             "uncompressed, per layer, the answer position's attention % on the image: " + percent(reads.image),
             "  on the evidence patches: " + percent(reads.evidence),
             "  on the first two grid rows: " + percent(reads.first_rows)]
    for r in readings:
        routed = ~np.isnan(r.first_rows_share)
        lines.append(f"v2v_rows={r.v2v_rows} ({r.setting}): accuracy {100 * r.accuracy:.1f}% (retention {100 * r.accuracy / full:.1f}%); "
                     f"kept tokens in the first two grid rows {100 * np.nanmean(r.first_rows_share):.1f}% "
                     f"(uniform {100 * FIRST_ROWS / S.GRID ** 2:.1f}%)")
        lines.append("  per layer, first-two-rows share %: " + " ".join(
            f"{100 * x:.0f}" if ok else "-" for x, ok in zip(r.first_rows_share, routed)))
        lines.append("  per layer, evidence patches kept %: " + " ".join(f"{100 * x:.0f}" for x in r.evidence_kept))
    return "\n".join(lines)


def plot(readings: list[Reading], path) -> None:
    """A row per reading, a panel per layer: how often each patch was kept (share of questions)."""
    layers = readings[0].kept_counts.shape[0]
    fig = agg_figure(1.3 * layers, 1.5 * len(readings) + 0.4)
    axes = fig.subplots(len(readings), layers, squeeze=False)
    for row, r in zip(axes, readings):
        top = r.kept_counts.max()
        for layer, ax in enumerate(row):
            ax.imshow(r.kept_counts[layer].reshape(S.GRID, S.GRID), vmin=0, vmax=top, cmap="magma")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"L{layer}", fontsize=7)
        row[0].set_ylabel(r.v2v_rows, fontsize=8)
    fig.suptitle("ALVTS: how often each patch was kept, per decoder layer (rows: v2v_rows)", fontsize=9)
    save_figure(fig, path, dpi=100)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="'local' (default), 'context' or a folder")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", default="out/alvts_v2v.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    full, readings, reads = measure(args.model, args.budget, args.limit)
    print(report(full, readings, reads))
    plot(readings, args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
