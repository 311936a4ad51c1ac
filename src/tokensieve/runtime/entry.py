"""The language model's entry: at prefill, drop the rows the vision side did not keep from every
tensor aligned with the sequence (the first level); at a decoding step, narrow the prompt's mask columns."""
from __future__ import annotations

from typing import Any

import torch

from .compat import cache_in
from .generation import cache_length
from .recording import new_stats
from .sequence import compact_rows
from .state import Level, SequenceState, VisualItem


def _brings_visual_inputs(kwargs: dict) -> bool:
    """Whether a forward carries images or videos to encode (or encoded ones), not only text."""
    return any(value is not None for name, value in kwargs.items()
               if name.startswith("pixel_values") or name == "mm_encoder_outputs")


def _left_padded_mask(mask, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The prefill's 2-D mask (B, S) (ones when None); ValueError for any other form or for right padding."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.long, device=device)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError("tokensieve needs a 2-D attention mask (or None); 4-D or compiled-cache masks are not supported")
    if not bool(mask[:, -1].all()):
        raise ValueError(
            "a row of this batch ends in padding (right padding); tokensieve needs every row to end at its last "
            "prompt token: pad on the left (tokenizer.padding_side = 'left', as generate needs anyway)"
        )
    return mask


class Entry:
    """Pre-hooks on the outer model (which placeholders hold which modality) and on the language model."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.visual_positions: dict[str, torch.Tensor] | None = None

    def capture_input_ids(self, module, args, kwargs):
        session = self.session
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        self.visual_positions = session.family.visual_positions(session.model, input_ids, embeds)
        if self.visual_positions is None or not _brings_visual_inputs(kwargs):
            return  # a text-only step (every decoding step): nothing to check
        if session.generation.tokens_behind(cache_in(kwargs)) is not None:
            if any(bool(positions.any()) for positions in self.visual_positions.values()):
                raise ValueError(
                    "a turn that continues a compressed cache brings new images or videos, which tokensieve cannot "
                    "compress into an existing cache yet; run the whole conversation again as one prompt (with all "
                    "its images) without the cache"
                )

    def enter_language_model(self, module, args, kwargs):
        if args:
            raise ValueError("tokensieve expects the language model to be called with keyword arguments")
        cache = cache_in(kwargs)
        if cache_length(cache) == 0:
            return args, self._prefill_entry(kwargs)
        if self.session.sequence is None:
            return None
        return args, self._decode_entry(kwargs, cache)

    def _prefill_entry(self, kwargs: dict) -> dict:
        session = self.session
        session.sequence, session.stats = None, None
        if not session.hold_routes:
            session.routes = {}
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        layout = self._visual_layout(batch, length, embeds.device)
        if layout is None:
            return kwargs
        keep, item, slot, pinned, items, batch_rows = layout
        selection = compact_rows(keep)
        mask = _left_padded_mask(kwargs.get("attention_mask"), batch, length, embeds.device)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=embeds.device)[None].expand(batch, -1)
        level = Level.select(selection, item, slot, pinned, mask)
        out = dict(kwargs)
        out["inputs_embeds"] = selection.gather(embeds, 1)
        out["attention_mask"] = level.mask
        out["position_ids"] = selection.gather(positions, -1)
        session.family.gather_language_kwargs(out, selection)
        session.sequence = SequenceState(original_length=length, levels=[level], items=items)
        level.counts()  # read back here, once, rather than inside a decoder layer
        if session.schedule.stages or session.schedule.routing is not None:
            level.locate(items, batch_rows)
        port = session.port
        session.stats = new_stats(len(session.parts.layers), selection, length, items, batch_rows, sum(port.flops.values()),
                                  [entry for entries in port.plans.values() for entry in entries], session.parts.text_config)
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
            modal_items = self.session.port.items.get(modality, [])
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
        state = self.session.sequence
        level = state.levels[0]
        expected = self.session.generation.compressed_length()
        if cache_length(cache) != expected:
            raise RuntimeError(
                f"the KV cache holds {cache_length(cache)} tokens but the compressed prefill left {expected}; "
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
