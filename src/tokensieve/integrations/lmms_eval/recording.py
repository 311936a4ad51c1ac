"""What each run of the `tokensieve` lmms-eval model records beside the task metrics: per task, the
mean number of visual tokens each decoder layer processed and the language model's prefill FLOPs
(decoder layers plus the method's own selection; the vision tower, the same for every method, is left
out), per prompt with images.

Compressed prefills are read from `handle.stats`; uncompressed ones are counted from the inputs
(every image placeholder token at every layer, every non-padding row at every layer), with the same
FLOPs formulas (`tokensieve.flops`).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ...flops import Widths, decoder_layer_flops
from ...runtime.compat import cache_in

PLACEHOLDERS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


@dataclass
class Totals:
    """Sums over the prompts of one task."""

    prompts: int = 0
    visual_tokens_per_layer: float = 0.0  # sum over prompts of each prompt's mean over the layers
    prefill_flops: float = 0.0

    def add(self, other: "Totals") -> None:
        self.prompts += other.prompts
        self.visual_tokens_per_layer += other.visual_tokens_per_layer
        self.prefill_flops += other.prefill_flops

    def summary(self) -> dict:
        n = max(self.prompts, 1)
        return {"prompts": self.prompts, "mean_visual_tokens_per_layer": self.visual_tokens_per_layer / n,
                "prefill_flops": self.prefill_flops / n}


def placeholder_mask(config, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: the image and video placeholder tokens of input_ids (B, S)."""
    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in {getattr(config, name, None) for name in PLACEHOLDERS} - {None}:
        visual |= input_ids == token
    return visual


def uncompressed_totals(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Totals:
    """A prefill of the untouched model: input_ids (B, S), attention_mask (B, S) or None (no padding)."""
    config = model.config
    visual = placeholder_mask(config, input_ids)
    rows = (attention_mask.sum(1) if attention_mask is not None else torch.full((input_ids.shape[0],), input_ids.shape[1]))
    text = config.get_text_config()
    widths = Widths.of(text)
    flops = text.num_hidden_layers * sum(decoder_layer_flops(widths, int(r)) for r in rows.tolist())
    return Totals(input_ids.shape[0], float(visual.sum()), float(flops))


def compressed_totals(stats) -> Totals:
    """A prefill a handle compressed, from its stats."""
    return Totals(int(stats.tokens_per_layer.shape[0]), float(stats.mean_tokens_per_layer.sum()),
                  float(stats.decoder_flops + stats.selection_flops))


def continues(kwargs: dict) -> bool:
    """Whether a forward that has run was a decoding step: its cache now holds more rows than it was given
    (a prefill leaves at most its own rows there). A generated token can be a placeholder token, so
    placeholders alone do not make a prefill."""
    cache = cache_in(kwargs)
    return cache is not None and cache.get_seq_length() > kwargs["input_ids"].shape[1]


class Recorder:
    """Per-task totals of the prefills the model runs while `watching(model, handle)` is open."""

    def __init__(self) -> None:
        self.tasks: dict[str, Totals] = {}
        self.task = ""

    @contextmanager
    def watching(self, model, handle=None):
        """Counts every prefill whose input_ids hold image or video placeholders until the block ends; the
        hook lives on this model instance and is removed on the way out."""
        def after_forward(module, args, kwargs, output):
            input_ids = kwargs.get("input_ids")
            if input_ids is None or continues(kwargs) or not placeholder_mask(module.config, input_ids).any():
                return
            totals = (compressed_totals(handle.stats) if handle is not None
                      else uncompressed_totals(module, kwargs["input_ids"], kwargs.get("attention_mask")))
            self.tasks.setdefault(self.task, Totals()).add(totals)

        hook = model.register_forward_hook(after_forward, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()

    def gathered(self) -> dict[str, Totals]:
        """The totals of every process (one when not distributed), summed per task; every rank calls this."""
        local = {task: asdict(t) for task, t in self.tasks.items()}
        parts = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, local)
        merged: dict[str, Totals] = {}
        for part in parts:
            for task, values in part.items():
                merged.setdefault(task, Totals()).add(Totals(**values))
        return merged

    def report(self, settings, num_layers: int) -> dict:
        return {"model": settings.pretrained, "method": settings.method_name, "setting": settings.label,
                "decoder_layers": num_layers,
                "tasks": {task: t.summary() for task, t in sorted(self.gathered().items())}}


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path
