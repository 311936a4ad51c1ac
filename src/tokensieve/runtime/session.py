"""The hooks of one `compress` call: vision-side stage 1, the language model's entry, stage 2, decoding."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..flops import Widths
from ..methods.base import Schedule, StageContext, StageRequest
from ..ops.plan import ReductionPlan
from .compat import cache_in, causal_mask
from .hooks import HookSet
from .routing import Route, extend_keep, scatter_back, top_rows
from .sequence import compact_rows
from .state import Level, SequenceState, Stats, VisualItem


def _cache_length(cache: Any, layer: int = 0) -> int:
    if cache is None:
        return 0
    return int(cache.get_seq_length(layer))


def _brings_visual_inputs(kwargs: dict) -> bool:
    """Whether a forward carries images or videos to encode (or encoded ones), not only text."""
    return any(value is not None for name, value in kwargs.items()
               if name.startswith("pixel_values") or name == "mm_encoder_outputs")


def _original_positions(selection, positions: torch.Tensor) -> torch.Tensor:
    """(B, S_new): the input position each kept row came from, -1 at the padding rows the selection adds."""
    return selection.gather(positions, 1).masked_fill(~selection.valid, -1)


class _UncompressedLength:
    """A compressed cache seen by code that only asks its length: the uncompressed sequence's."""

    def __init__(self, length: int) -> None:
        self._length = length

    def get_seq_length(self, layer: int = 0) -> int:
        return self._length


class Session:
    """Runtime state of one compressed model instance. Knows nothing of scoring: the schedule does.

    Flow of a prefill: the family's stage-1 hooks call `plan_items` and `add_item` while the vision
    side runs; `_enter_language_model` drops the rows stage 1 did not keep from every tensor aligned
    with the sequence; the hook after layer K-1 runs stage 2 on the hidden states; the pre-hooks of
    the later layers hand them the matching masks and rotary tables. During decoding the same row
    selections are applied to the attention-mask columns of the prefill.
    """

    def __init__(self, model: torch.nn.Module, family: Any, schedule: Schedule) -> None:
        self.model = model
        self.family = family
        self.schedule = schedule
        self.parts = family.parts(model)
        self.hooks = HookSet()
        self.items: dict[str, list[VisualItem]] = {}
        self.visual_positions: dict[str, torch.Tensor] | None = None
        self.sequence: SequenceState | None = None
        self.stats: Stats | None = None
        self.encoding_flops: dict[str, int] = {}  # stage-1 selection FLOPs of the last encoding per modality
        self.encoding_plans: dict[str, list] = {}  # its plans' kept indices: ((stage, n, keep), (keep,)) in call order
        self.routes: dict[int, Route] = {}
        self.hold_routes = False  # reuse the last prefill's routing for longer prefills of the same prompt
        self._previous_input: tuple | None = None  # input of the layer before a stage that reads it

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        """Place every hook; on any error nothing stays installed. May be called again after `remove`."""
        self.items, self.visual_positions, self.sequence, self.stats, self.routes = {}, None, None, None, {}
        try:
            if self.schedule.install is not None:
                self.schedule.install(self.model, self.family, self.hooks)
            self.family.install_stage1(self.model, self, self.hooks)
            self.hooks.wrap_method(self.model, "generate", self._one_sequence_per_prompt)
            self.hooks.wrap_method(self.model, "prepare_inputs_for_generation", self._continuation_slicer)
            self.hooks.wrap_method(self.model, "_prepare_position_ids_for_generation", self._continuation_positions)
            self.hooks.pre(self.parts.outer, self._capture_input_ids)
            self.hooks.pre(self.parts.language_model, self._enter_language_model)
            for index, layer in enumerate(self.parts.layers):
                self.hooks.pre(layer, self._layer_pre_hook(index))
            if self.schedule.routing is not None:
                for index in range(self.schedule.routing.start_layer, len(self.parts.layers)):
                    self.hooks.post(self.parts.layers[index], self._route_post_hook(index))
        except BaseException:
            self.hooks.remove()
            raise

    def remove(self) -> None:
        self.hooks.remove()
        self.items, self.visual_positions, self.sequence = {}, None, None

    def _one_sequence_per_prompt(self, original):
        """generate, refusing beam search and several sequences per prompt before anything runs: both
        repeat the prompt's rows after the images were encoded, which the compressed rows cannot follow."""

        def generate(*args, **kwargs):
            config = kwargs.get("generation_config") or self.model.generation_config
            for name in ("num_beams", "num_return_sequences"):
                value = kwargs.get(name, getattr(config, name, None))
                if value is not None and value > 1:
                    raise ValueError(
                        f"{name}={value} is not supported under tokensieve (the prompt's compressed rows would have to "
                        "be repeated per beam or sequence); use greedy or sampling with num_beams=1 and "
                        "num_return_sequences=1, or run one generate per sample"
                    )
            return original(*args, **kwargs)

        return generate

    # ------------------------------------------------------------------ continuing a compressed cache
    def _tokens_behind(self, cache: Any) -> int | None:
        """Tokens of the uncompressed sequence the compressed `cache` stands for (None: not this prefill's)."""
        state = self.sequence
        if state is None or _cache_length(cache) != self._compressed_length():
            return None
        return state.original_length + state.decoded

    def _compressed_length(self) -> int:
        """Rows the KV cache holds after this prefill and the tokens decoded since (its first layer's)."""
        first = self.routes.get(0)
        prefill = first.selection.length if first is not None else self.sequence.level_of(0).length
        return prefill + self.sequence.decoded

    def _continuation_slicer(self, original):
        """generate slices the new tokens off the full conversation by the cache's length, which
        compression shortened: give it the count of new tokens measured on the uncompressed sequence."""

        def prepare(input_ids, next_sequence_length=None, **kwargs):
            cache = cache_in(kwargs)
            behind = self._tokens_behind(cache)
            if kwargs.get("is_first_iteration") and next_sequence_length is not None and behind is not None:
                shortened_by = behind - _cache_length(cache)
                next_sequence_length -= shortened_by
                if next_sequence_length < 1:
                    raise ValueError(
                        f"the conversation passed holds {input_ids.shape[1]} tokens, no more than the {behind} this "
                        "compressed cache already holds; append the new turn's tokens to the previous output"
                    )
            return original(input_ids, next_sequence_length=next_sequence_length, **kwargs)

        return prepare

    def _continuation_positions(self, original):
        """generate's position ids for a conversation continued on the compressed cache, derived as if the
        cache held the uncompressed conversation (Qwen-VL reads the cache's length to tell the cached
        tokens from new images, and would otherwise recompute the M-RoPE positions wrongly)."""

        def positions(inputs_tensor, model_kwargs):
            cache = cache_in(model_kwargs)
            behind = self._tokens_behind(cache)
            if behind is not None:
                model_kwargs = {**model_kwargs, "cache": _UncompressedLength(behind)}
                model_kwargs.pop("past_key_values", None)
            return original(inputs_tensor, model_kwargs)

        return positions

    # ------------------------------------------------------------------ stage 1 (called by families)
    def stage1_keep(self, budget_tokens: int) -> int:
        """What stage 1 keeps of an item (or frame) of this many tokens, the method's minimum at least."""
        return self.schedule.count(self.schedule.stage1_keep, budget_tokens, budget_tokens)

    def plan_items(
        self, features: Sequence[torch.Tensor], keeps: Sequence[int], modality: str = "image"
    ) -> list[ReductionPlan | None]:
        """Stage-1 plans for items of (n_i, D) features keeping keeps[i] each (None: keep all).

        Items of equal (n, keep) are reduced together as one batch.
        """
        plans: list[ReductionPlan | None] = [None] * len(features)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (x, keep) in enumerate(zip(features, keeps)):
            if keep < x.shape[0]:
                groups.setdefault((x.shape[0], keep), []).append(i)
        for (n, keep), members in groups.items():
            self.encoding_flops[modality] = self.encoding_flops.get(modality, 0) + self._plan_flops(
                n, keep, features[members[0]].shape[-1], len(members))
            plan = self.schedule.plan(torch.stack([features[i] for i in members]), keep, "stage1")
            self.encoding_plans.setdefault(modality, []).extend((("stage1", n, keep), row) for row in plan.kept_index)
            for j, i in enumerate(members):
                plans[i] = ReductionPlan(
                    plan.kept_index[j : j + 1], None if plan.weights is None else plan.weights[j : j + 1]
                )
        return plans

    def begin_items(self, modality: str) -> None:
        """A new encoding of this modality starts: forget the items of the previous one."""
        self.items[modality] = []
        self.encoding_flops[modality] = 0
        self.encoding_plans[modality] = []

    def _plan_flops(self, n: int, keep: int, width: int, count: int) -> int:
        """FLOPs of `count` plans reducing n tokens of this width to keep (0 if the method says nothing)."""
        if self.schedule.plan_flops is None:
            return 0
        return count * self.schedule.plan_flops(n, keep, width)

    def add_item(self, item: VisualItem) -> None:
        if any(self.stage1_keep(budget) > self.schedule.asked(self.schedule.stage1_keep, budget, budget)
               for _, _, budget in item.spans()):
            item.floored.add("stage1")
        self.items.setdefault(item.modality, []).append(item)

    # ------------------------------------------------------------------ hooks
    def _capture_input_ids(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        self.visual_positions = self.family.visual_positions(self.model, input_ids, embeds)
        continuing = self._tokens_behind(cache_in(kwargs)) is not None
        if continuing and self.visual_positions is not None and _brings_visual_inputs(kwargs):
            if any(bool(positions.any()) for positions in self.visual_positions.values()):
                raise ValueError(
                    "a turn that continues a compressed cache brings new images or videos, which tokensieve cannot "
                    "compress into an existing cache yet; run the whole conversation again as one prompt (with all "
                    "its images) without the cache"
                )

    def _enter_language_model(self, module, args, kwargs):
        if args:
            raise ValueError("tokensieve expects the language model to be called with keyword arguments")
        cache = cache_in(kwargs)
        if _cache_length(cache) == 0:
            return args, self._prefill_entry(kwargs)
        if self.sequence is None:
            return None
        return args, self._decode_entry(kwargs, cache)

    def _prefill_entry(self, kwargs: dict) -> dict:
        self.sequence, self.stats = None, None
        if not self.hold_routes:
            self.routes = {}
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        layout = self._visual_layout(batch, length, embeds.device)
        if layout is None:
            return kwargs
        keep, item, slot, pinned, items, batch_rows = layout
        selection = compact_rows(keep)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("tokensieve needs a 2-D attention mask (or None); 4-D or compiled-cache masks are not supported")
        if not bool(mask[:, -1].all()):
            raise ValueError(
                "a row of this batch ends in padding (right padding); tokensieve needs every row to end at its last "
                "prompt token: pad on the left (tokenizer.padding_side = 'left', as generate needs anyway)"
            )
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=embeds.device)[None].expand(batch, -1)
        level = Level.select(selection, item, slot, pinned, mask)
        out = dict(kwargs)
        out["inputs_embeds"] = selection.gather(embeds, 1)
        out["attention_mask"] = level.mask
        out["position_ids"] = selection.gather(positions, -1)
        self.family.gather_language_kwargs(out, selection)
        self.sequence = SequenceState(original_length=length, levels=[level], items=items)
        level.counts()  # read back here, once, rather than inside a decoder layer
        if self.schedule.stages or self.schedule.routing is not None:
            level.locate(items, batch_rows)
        self.stats = Stats(
            tokens_per_layer=torch.zeros(batch, len(self.parts.layers), dtype=torch.long),
            rows_per_layer=torch.zeros(batch, len(self.parts.layers), dtype=torch.long),
            kept=[{"stage1": it.keep.nonzero().flatten()} for it in items],
            rows=batch_rows,
            items=items,
            selection_flops=sum(self.encoding_flops.values()),
            plans=[entry for entries in self.encoding_plans.values() for entry in entries],
            widths=Widths.of(self.parts.text_config),
            positions=_original_positions(selection, torch.arange(length, device=embeds.device)[None].expand(batch, -1)),
        )
        return out

    def _visual_layout(self, batch: int, length: int, device: torch.device):
        """Per-row visual bookkeeping of the input sequence, or None when there is nothing visual.

        Returns keep, item, slot, pinned (each (B, S)), the items in sequence order and the batch row of each.
        """
        if self.visual_positions is None:
            return None
        item = torch.full((batch, length), -1, dtype=torch.long, device=device)
        slot = torch.zeros(batch, length, dtype=torch.long, device=device)
        pinned = torch.zeros(batch, length, dtype=torch.bool, device=device)
        keep = torch.ones(batch, length, dtype=torch.bool, device=device)
        items: list[VisualItem] = []
        found = False
        for modality, positions in self.visual_positions.items():
            positions = positions.to(device)
            count = int(positions.sum())
            if count == 0:
                continue
            modal_items = self.items.get(modality, [])
            if not modal_items:
                continue  # features not compressed by us (e.g. passed in by the caller): leave as is
            encoded = sum(it.keep.numel() for it in modal_items)
            if encoded != count:
                raise RuntimeError(
                    f"{count} {modality} placeholder tokens in the input but the last {modality} encoding produced "
                    f"{encoded} features; encode the images of this input again (beam search and "
                    "num_return_sequences > 1 are not supported yet)"
                )
            found = True
            offset = len(items)
            items.extend(modal_items)
            item[positions] = torch.cat(
                [torch.full((it.keep.numel(),), offset + i, device=device) for i, it in enumerate(modal_items)]
            )
            slot[positions] = torch.cat([torch.arange(it.keep.numel(), device=device) for it in modal_items])
            pinned[positions] = torch.cat([self._pinned(it).to(device) for it in modal_items])
            keep[positions] = torch.cat([it.keep.to(device) for it in modal_items])
        if not found:
            return None
        visual = item >= 0
        first = self._first_positions(item, len(items))
        order = sorted(range(len(items)), key=first.__getitem__)  # items in sequence order (row-major)
        items, batch_rows = [items[i] for i in order], [first[i] // length for i in order]
        remap = torch.empty(len(order), dtype=torch.long, device=device)
        remap[torch.tensor(order, device=device)] = torch.arange(len(order), device=device)
        item = torch.where(visual, remap[item.clamp(min=0)], item)
        return keep, item, slot, pinned, items, batch_rows

    @staticmethod
    def _pinned(item: VisualItem) -> torch.Tensor:
        return item.pinned if item.pinned is not None else torch.zeros_like(item.keep)

    @staticmethod
    def _first_positions(item: torch.Tensor, count: int) -> list[int]:
        """Where each item id first appears in the (B, S) batch, as a row-major flat index."""
        flat = item.flatten()
        return [int((flat == i).nonzero()[0]) for i in range(count)]

    def _decode_entry(self, kwargs: dict, cache: Any) -> dict:
        state = self.sequence
        level = state.levels[0]
        expected = self._compressed_length()
        if _cache_length(cache) != expected:
            raise RuntimeError(
                f"the KV cache holds {_cache_length(cache)} tokens but the compressed prefill left {expected}; "
                "a cache from another prompt cannot be continued under this handle"
            )
        embeds = kwargs["inputs_embeds"]
        batch, queries = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        total = state.original_length + state.decoded + queries
        if mask is None:
            state.new_columns = torch.ones(batch, state.decoded + queries, dtype=level.mask.dtype, device=embeds.device)
            prefix = level.mask
        elif mask.dim() == 2 and mask.shape[1] == total:
            state.new_columns = mask[:, state.original_length :]
            prefix = level.selection.gather_mask(mask[:, : state.original_length])
        else:
            raise ValueError(
                f"attention_mask of shape {tuple(mask.shape)} does not cover the {total} tokens of the uncompressed "
                "sequence; pass the full 2-D mask, as generate does"
            )
        out = dict(kwargs)
        out["attention_mask"] = torch.cat([prefix, state.new_columns.to(prefix.dtype)], dim=1)
        if kwargs.get("position_ids") is None:
            start = state.original_length + state.decoded
            out["position_ids"] = torch.arange(start, start + queries, device=embeds.device)[None].expand(batch, -1)
        state.decoded += queries
        return out

    # ------------------------------------------------------------------ per layer
    def _layer_pre_hook(self, index: int):
        def hook(module, args, kwargs):
            state = self.sequence
            if state is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            prefill = state.decoded == 0
            stage = self.schedule.stage_at(index)
            if prefill and stage is not None and stage.name not in state.applied:
                hidden = self._run_stage(stage, index, hidden, kwargs)
                args, kwargs = ((hidden,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            level = state.level_of(index)
            if prefill:
                if hidden.shape[1] != level.length:
                    raise RuntimeError(f"layer {index} received {hidden.shape[1]} rows, expected {level.length}")
                self.stats.tokens_per_layer[:, index], self.stats.rows_per_layer[:, index] = level.counts()
            if level is not state.levels[0]:
                kwargs = self._narrow_layer_kwargs(index, level, hidden, kwargs, prefill)
            following = self.schedule.stage_at(index + 1)
            if prefill and following is not None and following.reads_previous_layer:
                self._previous_input = (hidden, kwargs.get("position_embeddings"))
            routing = self.schedule.routing
            if routing is not None and index >= routing.start_layer:
                return self._route(index, module, level, hidden, args, kwargs, prefill)
            return args, kwargs
        return hook

    def _narrow_layer_kwargs(self, index: int, level: Level, hidden: torch.Tensor, kwargs: dict, prefill: bool):
        if index == level.first_layer:
            level.layer_mask = self._layer_mask(level, hidden, cache_in(kwargs), prefill)
        out = dict(kwargs)
        out["attention_mask"] = level.layer_mask
        if prefill:
            rotary = kwargs.get("position_embeddings")
            if rotary is not None:
                if level.rotary is None or level.rotary[0] is not rotary:
                    level.rotary = (rotary, tuple(self._narrow_from_level0(level, t, -2) for t in rotary))
                out["position_embeddings"] = level.rotary[1]
            if kwargs.get("position_ids") is not None:
                out["position_ids"] = self._narrow_from_level0(level, kwargs["position_ids"], -1)
        return out

    def _narrow_from_level0(self, level: Level, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        for step in self.sequence.levels[1 : self.sequence.levels.index(level) + 1]:
            x = step.selection.gather(x, seq_dim)
        return x

    def _layer_mask(self, level: Level, hidden: torch.Tensor, cache: Any, prefill: bool):
        """The 4-D mask of a level's layers; at prefill its padding is known on the host."""
        if prefill:
            return self._causal_mask(hidden, level.mask, cache, level.first_layer, level.padded())
        return self._decode_mask(hidden, level.mask, cache, level.first_layer)

    def _decode_mask(self, hidden: torch.Tensor, prompt_mask: torch.Tensor, cache: Any, layer: int):
        """The 4-D mask of a decoding step over these prompt columns (B, S_l) and the new ones. The
        caller's new columns are not read back, so the mask is built whether or not it pads."""
        mask = torch.cat([prompt_mask, self.sequence.new_columns.to(prompt_mask.dtype)], dim=1)
        return self._causal_mask(hidden, mask, cache, layer, padded=True)

    # ------------------------------------------------------------------ routing (ALVTS)
    def _route(self, index: int, layer, level: Level, hidden: torch.Tensor, args, kwargs: dict, prefill: bool):
        cache = cache_in(kwargs)
        if not prefill:
            route = self.routes[index]
            mask = self._decode_mask(hidden, route.selection.gather_mask(level.mask), cache, index)
            return args, {**kwargs, "attention_mask": mask}
        route = self._choose_route(index, layer, level, hidden, kwargs)
        self.routes[index] = route
        selection = route.selection
        narrowed = selection.gather(hidden, 1)
        out = dict(kwargs)
        out["attention_mask"] = self._causal_mask(narrowed, selection.gather_mask(level.mask), cache, index, route.padded)
        out["position_embeddings"] = tuple(selection.gather(t, -2) for t in kwargs["position_embeddings"])
        if kwargs.get("position_ids") is not None:
            out["position_ids"] = selection.gather(kwargs["position_ids"], -1)
        visual, rows = level.counts()
        routed = torch.tensor(route.visual_per_row)
        self.stats.tokens_per_layer[:, index] = routed
        self.stats.rows_per_layer[:, index] = rows - visual + routed
        for kept, slots in zip(self.stats.kept, route.slots):
            kept[f"layer{index}"] = slots
        return ((narrowed,) + tuple(args[1:]), out) if args else (args, {**out, "hidden_states": narrowed})

    def _choose_route(self, index: int, layer, level: Level, hidden: torch.Tensor, kwargs: dict) -> Route:
        held = self.routes.get(index) if self.hold_routes else None
        if held is not None and held.keep.shape[1] <= level.length:
            extra = level.length - held.keep.shape[1]
            keep = extend_keep(held.keep, level.length)
            return Route(keep, compact_rows(keep, held.selection.length + extra), hidden, held.slots, held.visual_per_row,
                         held.padded)
        routing = self.schedule.routing
        valid = level.selection.valid & level.mask.bool()
        _, rows = level.counts()
        items_per_row = self.stats.items_per_row(len(rows))
        scores = routing.score(index, layer, hidden, kwargs["position_embeddings"], level.item, valid, max(items_per_row))
        if routing.flops is not None:
            self.stats.selection_flops += sum(
                routing.flops(index, self.stats.widths, r, n) for r, n in zip(rows.tolist(), items_per_row))
        choice = top_rows(scores, level, self.sequence.items, index, self.schedule)
        pinned, fixed = level.fixed_counts()
        lengths = [f + v - p for f, v, p in zip(fixed, choice.visual_per_row, pinned)]  # rows each batch row routes
        padded = level.padded() or min(lengths) < max(lengths)
        return Route(choice.keep, compact_rows(choice.keep, max(lengths)), hidden, choice.slots, choice.visual_per_row,
                     padded)

    def _route_post_hook(self, index: int):
        def hook(module, args, kwargs, output):
            route = self.routes.get(index)
            if self.sequence is None or self.sequence.decoded > 0 or route is None or route.full_hidden is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            merged = scatter_back(route.full_hidden, hidden, route.selection)
            route.full_hidden = None
            return (merged,) + tuple(output[1:]) if isinstance(output, tuple) else merged
        return hook

    def _causal_mask(self, hidden: torch.Tensor, mask: torch.Tensor, cache: Any, layer: int, padded: bool | None = None):
        return causal_mask(self.parts.text_config, hidden, mask, cache, layer, padded)

    # ------------------------------------------------------------------ inner stages
    def _run_stage(self, stage, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Reduce the visual rows before layer `index`: a new level; returns its hidden states."""
        state = self.sequence
        level = state.levels[-1]
        rotary = kwargs["position_embeddings"]
        if level is not state.levels[0]:
            rotary = tuple(self._narrow_from_level0(level, t, -2) for t in rotary)
        context = StageContext(
            layer=index, hidden=hidden, rotary=rotary, item=level.item,
            valid=level.selection.valid & level.mask.bool(), layers=self.parts.layers,
            norm=getattr(self.parts.language_model, "norm", None),
            previous=self._previous_input if stage.reads_previous_layer else None, cache={},
        )
        requests = self._stage_requests(stage, level, state.items)
        plans = stage.plan(context, requests) if requests else []
        keep, hidden, kept_positions = self._apply_stage_plans(level, hidden, requests, plans)
        self.stats.plans += [((stage.name, r.positions.numel(), r.keep), p.kept_index[0]) for r, p in zip(requests, plans)]
        if stage.flops is not None:
            self.stats.selection_flops += sum(stage.flops(r.positions.numel(), r.keep, hidden.shape[-1]) for r in requests)
        kept_spans = [{} for _ in state.items]
        for request, kept in zip(requests, kept_positions):
            kept_spans[request.item][request.span] = kept
        next_level = level.narrowed(keep, index, kept_spans)
        state.levels.append(next_level)
        state.applied.add(stage.name)
        self.stats.positions = _original_positions(next_level.selection, self.stats.positions)
        self._previous_input = None
        for rows, item_kept in zip(next_level.rows, self.stats.kept):
            item_kept[stage.name] = next_level.slot[rows.batch_row, torch.cat([rows.unpinned, rows.pinned])].sort().values
        return next_level.selection.gather(hidden, 1)

    def _stage_requests(self, stage, level: Level, items: list[VisualItem]) -> list[StageRequest]:
        """One request per item segment with more unpinned visual rows than the stage keeps."""
        requests = []
        for i, (item, rows) in enumerate(zip(items, level.rows)):
            for span, ((_, _, budget_tokens), positions) in enumerate(zip(item.spans(), rows.spans)):
                target = self.schedule.count(stage.keep, budget_tokens, positions.numel())
                if target > self.schedule.asked(stage.keep, budget_tokens, positions.numel()):
                    item.floored.add(stage.name)
                if target < positions.numel():
                    requests.append(StageRequest(i, rows.batch_row, positions, target, span))
        return requests

    @staticmethod
    def _apply_stage_plans(level: Level, hidden: torch.Tensor, requests: list[StageRequest], plans: list):
        """keep (B, S) bool, hidden states whose kept rows hold the plans' outputs where they merge, and
        the positions each request kept."""
        keep = torch.ones(level.item.shape, dtype=torch.bool, device=hidden.device)
        hidden = hidden.clone()
        kept = []
        for request, plan in zip(requests, plans):
            plan = plan.to(hidden.device)
            kept_positions = request.positions[plan.kept_index[0]]
            keep[request.row, request.positions] = False
            keep[request.row, kept_positions] = True
            if plan.weights is not None:
                hidden[request.row, kept_positions] = plan.apply(hidden[request.row, request.positions][None])[0]
            kept.append(kept_positions)
        return keep, hidden, kept
