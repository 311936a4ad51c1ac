"""Qwen2-VL, Qwen2.5-VL (`qwen2_vl`, `qwen2_5_vl`) and Qwen3-VL (`qwen3_vl`).

Stage 1 runs on the patch merger's output (already projected to the language model's width), per
image, inside `model.model.get_image_features` / `get_video_features`, which this family wraps on
the instance. The wrapped method still returns one (n_i, D) tensor per item in `pooler_output`
(the model checks it against the placeholder count): the plan's output sits at the kept rows and
zeros elsewhere. The language model's entry hook then drops the unkept rows from the hidden states,
the 2-D mask and every row of the M-RoPE position ids (3 rows, or 4 with generate's text row),
so each kept token keeps its original 3-D position and the gaps stay.

Videos: stage 1 runs per temporal frame group (grid t), spatially only, with no merging across
frames: each frame group of n_f tokens keeps `port.keep(n_f)` of them. The whole video is ONE
`VisualItem` whose keep mask concatenates its frames, with one segment per frame group; a stage
before a decoder layer reduces each segment on its own too (per frame, never across frames).

Qwen3-VL deepstack: the vision tower also returns `deepstack_features` (per deepstack layer, one
(n_i, D) tensor per item) that the language model adds to the visual rows of its first decoder
layers. Each is reduced with the SAME ReductionPlan as the main features, so kept rows stay aligned;
`gather_language_kwargs` narrows `visual_pos_masks` and `deepstack_visual_embeds` at the entry.
Stage 2 must come after the last deepstack layer (see `Qwen3VLFamily`).

Decoding: generate passes the position ids of new tokens, continued from the uncompressed prompt's
(the last original position + 1), so decoding continues at the original positions; the runtime
only narrows the prefill's mask columns. A hand-written loop that passes neither position ids nor
an attention mask would get positions from the (shortened) cache length; `decode_positions_hook`
gives it the original ones.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from transformers.vision_utils import get_vision_window_index

from ..runtime.compat import cache_in
from ..runtime.hooks import HookSet
from ..runtime.port import FamilyPort
from ..runtime.schedule import Schedule
from ..runtime.sequence import RowSelection
from ..runtime.state import VisualItem
from .base import Family, ReducedPart, reduce_parts, stage0_on_vision_side
from .vision_attention import VisionLayer

Span = tuple[int, int]  # (start, length) of one frame group among an item's merged tokens


def frame_spans(grid_thw: torch.Tensor, merge: int) -> list[list[Span]]:
    """Per item of grid_thw (I, 3) (patch units): the (start, length) of each frame group's merged tokens."""
    spans = []
    for t, h, w in grid_thw.tolist():
        frame = (h // merge) * (w // merge)
        spans.append([(f * frame, frame) for f in range(t)])
    return spans


def apply_frames(x: torch.Tensor, spans: Sequence[Span], frames: Sequence[ReducedPart]) -> torch.Tensor:
    """x (n, D) -> (n, D): each frame's plan output at its kept rows, zeros at its dropped rows (x
    itself when no frame was reduced)."""
    if all(frame.plan is None for frame in frames):
        return x
    return torch.cat([frame.apply(x[start : start + length]) for (start, length), frame in zip(spans, frames)])


def feature_rows(visual: torch.nn.Module, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(T,) long: the row of the last ViT block's reading (one per merge group, in the order the
    blocks see them) that each of the T features the tower returns for grid_thw (I, 3) comes from.

    Qwen2.5-VL's tower reorders the merge groups into attention windows before its blocks and back
    after its merger; Qwen2-VL's and Qwen3-VL's keep the order.
    """
    total = int((grid_thw.prod(-1) // (merge * merge)).sum())
    if getattr(visual, "window_size", None) is None:
        return torch.arange(total)
    window_index, _ = get_vision_window_index(grid_thw, merge, visual.window_size, visual.patch_size)
    return torch.argsort(window_index.cpu())


def check_spans(n: int, spans: Sequence[Span]) -> None:
    """ValueError unless the spans cover the item's n tokens."""
    described = sum(length for _, length in spans)
    if described != n:
        raise ValueError(f"grid_thw describes {described} tokens but the vision tower returned {n} for this item")


def selected_positions(selection: RowSelection, length: int) -> torch.Tensor:
    """(B, length) bool: the original positions a RowSelection keeps (new padding slots select nothing)."""
    index = selection.gather_index.masked_fill(~selection.valid, length)  # padding -> a spare column
    selected = torch.zeros(index.shape[0], length + 1, dtype=torch.bool, device=index.device)
    return selected.scatter_(1, index, True)[:, :length]


def decode_positions_hook(port: FamilyPort) -> Callable:
    """Pre-hook on the outer model: original M-RoPE positions for a decoding step given neither
    position_ids nor attention_mask (a hand-written loop; generate always passes both).

    The model would derive them from the cache length, which compression shortened; this uses the
    uncompressed length instead: (3, B, q) = original length + decoded + arange(q) + rope_deltas (B, 1).
    """

    def hook(module, args, kwargs):
        if args or kwargs.get("position_ids") is not None or kwargs.get("attention_mask") is not None:
            return None  # generate passes both: only a hand-written step gets here
        start = port.tokens_behind(cache_in(kwargs))  # None unless this handle's compressed cache
        if start is None or module.rope_deltas is None:
            return None
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        batch, queries = tokens.shape[:2]
        positions = torch.arange(start, start + queries, device=tokens.device).expand(3, batch, queries)
        deltas = module.rope_deltas.repeat_interleave(batch // module.rope_deltas.shape[0], dim=0)
        return args, {**kwargs, "position_ids": positions + deltas.to(tokens.device)}

    return hook


class _Reentry:
    """True while one of our wrappers runs: Qwen3-VL's get_video_features calls get_image_features."""

    def __init__(self) -> None:
        self.active = False


class QwenVLFamily(Family):
    """Qwen2-VL and Qwen2.5-VL: stage 1 on the merger's output, per image and per video frame group."""

    model_types = ("qwen2_vl", "qwen2_5_vl")

    def token_ids(self, config: Any) -> dict[str, int]:
        return {"image": config.image_token_id, "video": config.video_token_id}

    def check(self, model: torch.nn.Module) -> None:
        text = model.config.get_text_config()
        if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
            raise ValueError(
                f"{model.config.model_type} with sliding-window attention layers is not supported (the compressed "
                "sequence gets full causal masks only); load it with use_sliding_window=False"
            )

    def install_vision_side(self, model: torch.nn.Module, port: FamilyPort, hooks: HookSet) -> None:
        outer = model.model
        reentry = _Reentry()
        for modality in ("image", "video"):
            make = self._wrapper_factory(modality, outer.visual, port, reentry)
            hooks.wrap_method(outer, f"get_{modality}_features", make)
        hooks.pre(outer, decode_positions_hook(port))

    def vision_feature_layer(self, model: torch.nn.Module) -> VisionLayer:
        """The last ViT block; the features are its patch merger's rows (one per 2x2 group of block rows)."""
        visual = model.model.visual
        merge = model.config.vision_config.spatial_merge_size
        return VisionLayer(layer=visual.blocks[-1], cls=False, group=merge * merge)

    def _wrapper_factory(self, modality: str, visual: torch.nn.Module, port: FamilyPort, reentry: _Reentry) -> Callable:
        def make_wrapper(original: Callable) -> Callable:
            def wrapper(*args, **kwargs):
                if reentry.active:
                    return original(*args, **kwargs)
                grid_thw = kwargs.get(f"{modality}_grid_thw", args[1] if len(args) > 1 else None)
                if grid_thw is None:
                    raise ValueError(f"get_{modality}_features needs {modality}_grid_thw to split the features")
                as_tuple = kwargs.get("return_dict") is False
                reentry.active = True
                try:
                    output = original(*args, **{**kwargs, "return_dict": True})
                finally:
                    reentry.active = False
                self._vision_side(output, grid_thw, visual, modality, port)
                return output.to_tuple() if as_tuple else output

            return wrapper

        return make_wrapper

    def _vision_side(self, output: Any, grid_thw: torch.Tensor, visual: torch.nn.Module, modality: str,
                     port: FamilyPort) -> None:
        """Reduce every frame group of every item of `output` in place and record the items.

        output.pooler_output: tuple of (n_i, D), one per row of grid_thw (I, 3); deepstack_features
        (Qwen3-VL): list over deepstack layers of such tuples, reduced with the same plans.
        """
        merge = visual.spatial_merge_size
        features = output.pooler_output
        deepstack = list(getattr(output, "deepstack_features", None) or [])
        port.begin_items(modality)
        spans = frame_spans(grid_thw, merge)
        frames = self._reduce_frames(features, spans, port, modality, visual, grid_thw)
        output.pooler_output = tuple(apply_frames(x, s, f) for x, s, f in zip(features, spans, frames))
        if deepstack:
            output.deepstack_features = [
                tuple(apply_frames(x, s, f) for x, s, f in zip(layer, spans, frames)) for layer in deepstack
            ]
        for x, item_spans, item_frames, (t, h, w) in zip(features, spans, frames, grid_thw.tolist()):
            grid = (h // merge, w // merge) if t == 1 else None
            keep = torch.cat([frame.keep(x.device) for frame in item_frames])
            segments = tuple(length for _, length in item_spans) if len(item_spans) > 1 else None
            port.add_item(VisualItem(modality, keep, grid=grid, segments=segments))

    @staticmethod
    def _reduce_frames(features: Sequence[torch.Tensor], spans: list[list[Span]], port: FamilyPort, modality: str,
                       visual: torch.nn.Module, grid_thw: torch.Tensor) -> list[list[ReducedPart]]:
        """Vision-side plans per item and frame group (equal sizes are planned as one batch).

        features: one (n_i, D) per item. Checks that grid_thw describes every item first.
        """
        for x, item_spans in zip(features, spans):
            check_spans(x.shape[0], item_spans)
        offsets = torch.tensor([0] + [x.shape[0] for x in features]).cumsum(0).tolist()
        units = [(i, start, length) for i, item_spans in enumerate(spans) for start, length in item_spans]
        sources = None
        if port.reads_vision_attention:
            rows = feature_rows(visual, grid_thw, visual.spatial_merge_size)
            sources = [rows[offsets[i] + start : offsets[i] + start + length] for i, start, length in units]
        flat = reduce_parts(port, [features[i][start : start + length] for i, start, length in units],
                            [port.keep(length) for _, _, length in units], modality, sources)
        frames: list[list[ReducedPart]] = [[] for _ in spans]
        for (i, _, _), part in zip(units, flat):
            frames[i].append(part)
        return frames


class Qwen3VLFamily(QwenVLFamily):
    """Qwen3-VL: as Qwen2.5-VL, plus deepstack features added to the visual rows of the first decoder layers.

    The language model adds deepstack feature l to the output of decoder layer l (l < n_deepstack)
    at `visual_pos_masks`, computed for the sequence that entered it; a stage inside the language
    model (before layer K) must therefore come after the last addition: K >= n_deepstack + 1. A stage
    before layer 0 that reads only the visual rows (`DecoderStage.vision_side`) runs on the vision side instead.
    Both are settled by `adapt_schedule` in `compress`, before any hook is placed (a stage at
    K = L // 2 meets it for the released models: 3 deepstack layers, 28 or more decoder layers).
    """

    model_types = ("qwen3_vl",)

    def adapt_schedule(self, model: torch.nn.Module, schedule: Schedule) -> Schedule:
        """A stage before decoder layer 0 that reads only each item's own rows runs on the vision side
        instead (as stage 1, deepstack features reduced with the same plan); any other stage must come
        after the last deepstack layer. ValueError naming the earliest allowed layer otherwise."""
        schedule = stage0_on_vision_side(schedule)
        deepstack = len(model.config.vision_config.deepstack_visual_indexes)
        for stage in schedule.stages:
            if stage.layer < deepstack + 1:
                raise ValueError(
                    f"the {stage.name} stage before decoder layer {stage.layer} would cut the sequence before "
                    f"Qwen3-VL's {deepstack} deepstack layers have added their features (after layers 0..{deepstack - 1}); "
                    f"start the method's reduction at layer {deepstack + 1} or later (its layer=/layers= field, e.g. "
                    f"layer={deepstack + 1})"
                )
        return schedule

    def gather_language_kwargs(self, kwargs: dict, selection: RowSelection) -> None:
        """Narrow visual_pos_masks (B, S) -> (B, S_new) and keep the matching rows of each deepstack embed.

        The kept deepstack rows are read from the selection itself (the visual positions it keeps, in
        row-major order), so they stay right even for visual tokens this handle did not encode.
        """
        mask = kwargs.get("visual_pos_masks")
        if mask is None:
            return
        kept = selected_positions(selection, mask.shape[1])[mask.to(selection.valid.device)]  # (n_visual,)
        kwargs["visual_pos_masks"] = selection.gather(mask.to(selection.valid.device), 1) & selection.valid
        embeds = kwargs.get("deepstack_visual_embeds")
        if embeds is not None:
            kwargs["deepstack_visual_embeds"] = [e[kept.to(e.device)] for e in embeds]
