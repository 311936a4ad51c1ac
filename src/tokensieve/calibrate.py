"""Fitting ALVTS selectors to their layers' full-rank scores (docs/methods.md, "ALVTS selectors and calibration")."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from .methods.alvts import layer_counts
from .models import family_for
from .runtime.hooks import HookSet
from .selectors import LayerSelector, LowRank, Selectors, layer_scores, svd_selectors


@dataclass
class LayerInput:
    """What one decoder layer received for one sample batch (kept on the CPU).

    hidden (B, S, D), rotary (cos, sin) each (B or 1, S, d), item (B, S) visual item per row
    (-1 for text), valid (B, S) bool.
    """

    hidden: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor]
    item: torch.Tensor
    valid: torch.Tensor


def visual_items(visual: torch.Tensor) -> torch.Tensor:
    """Number each maximal run of visual positions as one item: visual (B, S) bool -> (B, S) long, -1 elsewhere."""
    starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
    run = starts.flatten().cumsum(0).view_as(visual) - 1
    return torch.where(visual, run, torch.full_like(run, -1))


def collect_layer_inputs(model: torch.nn.Module, samples: Iterable[dict]) -> list[list[LayerInput]]:
    """Run the unpruned model on each sample batch and keep every decoder layer's input.

    Returns inputs[layer][sample]. Memory: samples x layers x S x D floats.
    """
    family = family_for(model)
    layers = family.parts(model).layers
    inputs: list[list[LayerInput]] = [[] for _ in layers]
    hooks = HookSet()
    layout: dict = {}

    def capture(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rotary = tuple(t.detach().cpu() for t in kwargs["position_embeddings"])
            inputs[index].append(LayerInput(hidden.detach().cpu(), rotary, layout["item"], layout["valid"]))
        return hook

    try:
        for i, layer in enumerate(layers):
            hooks.pre(layer, capture(i))
        with torch.no_grad():
            for sample in samples:
                positions = family.visual_positions(model, sample.get("input_ids"), sample.get("inputs_embeds"))
                visual = torch.stack(list(positions.values())).any(0)
                layout["item"] = visual_items(visual).cpu()
                mask = sample.get("attention_mask")
                layout["valid"] = (mask.bool() if mask is not None else torch.ones_like(visual)).cpu()
                model(**sample)
    finally:
        hooks.remove()
    return inputs


def normalised(scores: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """Scores of the visual rows, each item scaled so its mean is 1: (B, S) -> (n_visual,)."""
    out = []
    for g in item.unique().tolist():
        if g >= 0:
            s = scores[item == g]
            out.append(s / s.mean().clamp(min=1e-30))
    return torch.cat(out)


def _topk_overlap(approx: torch.Tensor, oracle: torch.Tensor, item: torch.Tensor, k_of) -> float:
    overlaps = []
    for g in item.unique().tolist():
        if g >= 0:
            a, o = approx[item == g], oracle[item == g]
            k = min(k_of(a.numel()), a.numel())
            picked = set(a.argsort(descending=True, stable=True)[:k].tolist())
            truth = set(o.argsort(descending=True, stable=True)[:k].tolist())
            overlaps.append(len(picked & truth) / max(k, 1))
    return sum(overlaps) / max(len(overlaps), 1)


def layer_fidelity(layer, selector: LayerSelector | None, batches: list[LayerInput], k_of, oracle=None) -> dict:
    """Top-k overlap with the oracle's choice and MSE of the normalised scores, averaged over batches."""
    overlap, mse = [], []
    with torch.no_grad():
        for j, b in enumerate(batches):
            truth = oracle[j] if oracle is not None else layer_scores(layer, b.hidden, b.rotary, b.item, b.valid)
            approx = layer_scores(layer, b.hidden, b.rotary, b.item, b.valid, selector)
            overlap.append(_topk_overlap(approx, truth, b.item, k_of))
            mse.append(float((normalised(approx, b.item) - normalised(truth, b.item)).pow(2).mean()))
    return {"topk_overlap": sum(overlap) / len(overlap), "score_mse": sum(mse) / len(mse)}


def fit_layer(layer, selector: LayerSelector, batches: list[LayerInput], steps: int, lr: float) -> LayerSelector:
    """Adam on the selector's four factors, minimising the normalised score MSE against the oracle.

    The learning rate decays on a cosine, gradients are clipped to norm 1, and the factors with the
    lowest MSE over all batches (measured at the start and after every pass over them) are returned,
    so fitting never leaves a selector worse than its SVD start: the scores are heavy-tailed (a few
    tokens hold most of the attention), and a plain run can step away from a good start.
    """
    with torch.no_grad():
        oracle = [normalised(layer_scores(layer, b.hidden, b.rotary, b.item, b.valid), b.item) for b in batches]
    params = [p.detach().clone().requires_grad_(True) for p in selector.parameters()]
    fitted = LayerSelector(LowRank(params[0], params[1]), LowRank(params[2], params[3]))

    def mse(j: int) -> torch.Tensor:
        b = batches[j]
        return (normalised(layer_scores(layer, b.hidden, b.rotary, b.item, b.valid, fitted), b.item) - oracle[j]).pow(2).mean()

    def snapshot_if_better(best: tuple[float, list]) -> tuple[float, list]:
        with torch.no_grad():
            loss = sum(float(mse(j)) for j in range(len(batches))) / len(batches)
        return (loss, [p.detach().clone() for p in params]) if loss < best[0] else best

    best = snapshot_if_better((float("inf"), []))
    optimiser = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(steps, 1))
    for step in range(steps):
        loss = mse(step % len(batches))
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        if (step + 1) % len(batches) == 0 or step + 1 == steps:
            best = snapshot_if_better(best)
    a_q, b_q, a_k, b_k = best[1]
    return LayerSelector(LowRank(a_q, b_q), LowRank(a_k, b_k))


def calibrate_alvts(
    model: torch.nn.Module,
    samples: Iterable[dict],
    rank: int | None = None,
    steps: int = 200,
    lr: float = 1e-3,
    start_layer: int = 1,
    ratio: float = 64 / 576,
    progress: bool = True,
) -> Selectors:
    """Fit one low-rank selector per decoder layer (from start_layer on) to the full-rank scores.

    Each layer's input hidden states are collected from the unpruned model on `samples` (model
    input dicts: input_ids, attention_mask, pixel_values, ...); each selector starts from the
    truncated SVD of its layer's W_Q and W_K and is fitted independently, the model frozen.

    Args:
        rank: selector rank R, at most the model's hidden size (clipped to each projection's full rank;
            None: DEFAULT_RANK, or the hidden size if smaller).
        steps: Adam steps per layer; lr: its learning rate.
        ratio: budget (fraction of visual tokens) whose per-layer k the top-k overlap is measured at.
    Returns:
        Selectors with `fidelity[layer] = {"before": {...}, "after": {...}}` (top-k overlap, score MSE).
    Raises:
        ValueError (before any work) if a setting does not fit the model: see `check_settings`.
    """
    family = family_for(model)
    layers = family.parts(model).layers
    hidden_size = layers[0].self_attn.q_proj.in_features
    rank = resolve_rank(rank, hidden_size)
    check_settings(len(layers), hidden_size, rank, start_layer, ratio)
    selectors = svd_selectors(model.config.model_type, layers, rank, start_layer)
    inputs = collect_layer_inputs(model, list(samples))
    fidelity: list[dict] = [{} for _ in layers]

    def k_of(n: int, index: int = 0) -> int:
        return layer_counts(n, ratio * n, len(layers), 0)[index]

    for i in tqdm(range(start_layer, len(layers)), desc="calibrating ALVTS selectors", disable=not progress):
        layer, batches = layers[i], inputs[i]
        fidelity[i]["before"] = layer_fidelity(layer, selectors.layers[i], batches, lambda n: k_of(n, i))
        selectors.layers[i] = fit_layer(layer, selectors.layers[i], batches, steps, lr)
        fidelity[i]["after"] = layer_fidelity(layer, selectors.layers[i], batches, lambda n: k_of(n, i))
    selectors.fidelity = fidelity
    return selectors


DEFAULT_RANK = 256


def resolve_rank(rank: int | None, hidden_size: int) -> int:
    """The rank asked for, or DEFAULT_RANK capped at the model's hidden size when none was."""
    return min(DEFAULT_RANK, hidden_size) if rank is None else rank


def check_settings(num_layers: int, hidden_size: int, rank: int, start_layer: int, ratio: float) -> None:
    """ValueError saying what to change if the settings cannot calibrate a model of this size."""
    if not 0 <= start_layer < num_layers:
        raise ValueError(f"start layer {start_layer} is out of range: the model has {num_layers} decoder layers; "
                         f"give a start layer from 0 to {num_layers - 1}")
    if not 1 <= rank <= hidden_size:
        raise ValueError(f"rank {rank} does not fit the model's width (hidden size {hidden_size}); "
                         f"give a rank from 1 to {hidden_size}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio {ratio} is not in (0, 1]; give the fraction of visual tokens kept, "
                         "e.g. 0.111 (64 of 576)")


def decoder_size(model_dir: str | Path) -> tuple[int, int] | None:
    """(decoder layers, hidden size) of a saved model, read from its config without loading weights.

    The language model's config (`text_config`) when the model has one; None when the config cannot
    be read here (e.g. a model that needs remote code): `calibrate_alvts` checks after loading.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir)).get_text_config()
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    return (layers, hidden) if isinstance(layers, int) and isinstance(hidden, int) else None


def check_model_folder(model_dir: str | Path) -> None:
    """ValueError unless model_dir is a folder holding a saved model (its config.json)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; save the model and its processor there with save_pretrained")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds no config.json, so no saved model; save the model and its processor there "
                         "with save_pretrained")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_paths(paths: Iterable[str]) -> list[Path]:
    """Files as given, and the image files inside given folders (sorted); ValueError if none."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"no such image file or folder: {path}")
    if not found:
        raise ValueError("no images found; pass image files or folders holding .png/.jpg files")
    return found


def check_image(path: Path) -> None:
    """ValueError naming the file unless PIL can open and decode it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path} is not a readable image ({str(error).rstrip('.')}); "
                         "remove it or pass only image files (.png, .jpg, ...) and folders of them") from None


def readable_images(paths: Iterable[str]) -> list[Path]:
    """`image_paths`, each checked to be an image PIL can decode (ValueError naming the first that is not)."""
    found = image_paths(paths)
    for path in found:
        check_image(path)
    return found


DTYPES = ("float32", "bfloat16", "float16")


def load_model_and_samples(model_dir: str, images: Iterable[str], prompt: str, dtype: str | torch.dtype = "float32"):
    """A saved VLM (SDPA, eval, loaded in `dtype`) and one processed sample per image with `prompt`.

    Everything that can be wrong with the arguments (images, folder, prompt) raises ValueError before
    the model's weights are loaded.
    """
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = _torch_dtype(dtype)
    paths = readable_images(images)
    check_model_folder(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    samples = []
    for path in paths:
        with Image.open(path) as image:
            try:
                samples.append(dict(processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")))
            except ValueError as error:
                raise ValueError(f"the processor refused {path} with the prompt: {str(error).rstrip('.')}; check "
                                 "that the prompt holds the processor's image placeholder once (e.g. <image> for "
                                 "LLaVA)") from None
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch_dtype)
    return model.eval(), samples


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def fidelity_table(selectors: Selectors) -> str:
    """One line per calibrated layer: top-k overlap and score MSE before -> after fitting."""
    lines = ["layer  top-k overlap (before -> after)  score MSE (before -> after)"]
    for i, entry in enumerate(selectors.fidelity or []):
        if entry:
            b, a = entry["before"], entry["after"]
            lines.append(f"{i:>5}  {b['topk_overlap']:.3f} -> {a['topk_overlap']:.3f}"
                         f"{'':17}{b['score_mse']:.2e} -> {a['score_mse']:.2e}")
    return "\n".join(lines)
