"""The hooks of one `compress` call, and the state they share between the vision side, the language
model's layers and decoding.

Each job has its own file: `port` (what families call while the vision side runs), `entry` (the
language model's entry: the first level), `layers` (each decoder layer's rows, mask and rotary
tables), `stages` (reductions before a decoder layer), `routing` (per-layer selection, only when the
schedule routes), `generation` (generate's wrappers), `recording` (`handle.stats`).
"""
from __future__ import annotations

from typing import Any

import torch

from .entry import Entry
from .generation import GenerationGuards
from .hooks import HookSet
from .layers import LayerHooks
from .port import FamilyPort, VisionAttention
from .routing import Route, Router
from .schedule import Schedule
from .stages import StageRunner
from .state import SequenceState, Stats


class Session:
    """Runtime state of one compressed model instance. Knows nothing of scoring: the schedule does.

    Flow of a prefill: the family's vision-side hooks ask `port` for plans and record each item; the
    entry drops the rows the vision side did not keep from every tensor aligned with the sequence;
    the pre-hook of a layer with a stage before it reduces the hidden states to a new level; later
    layers get the matching masks and rotary tables; routed layers gather their rows and scatter their
    output back. During decoding the same row selections are applied to the prompt's mask columns.

    Attributes:
        sequence: the last compressed prefill's levels and the decoding since (None before one).
        stats: what it did (`handle.stats`).
        routes: per routed layer, its choice at the last prefill.
        hold_routes: reuse those choices for a longer prefill of the same prompt (validation).
        previous_input: the input of the layer before a stage that reads it.
    """

    def __init__(self, model: torch.nn.Module, family: Any, schedule: Schedule, attention: VisionAttention | None = None) -> None:
        self.model = model
        self.family = family
        self.schedule = schedule
        self.parts = family.parts(model)
        self.hooks = HookSet()
        self.generation = GenerationGuards(self)
        self.port = FamilyPort(schedule, self.generation.tokens_behind)
        self.port.attention = attention  # the family's reading of its vision layer, if the schedule needs it
        self.entry = Entry(self)
        self.layers = LayerHooks(self)
        self.stages = StageRunner(self)
        self.router = Router(self) if schedule.routing is not None else None
        self.sequence: SequenceState | None = None
        self.stats: Stats | None = None
        self.routes: dict[int, Route] = {}
        self.hold_routes = False
        self.previous_input: tuple | None = None

    def install(self) -> None:
        """Place every hook; on any error nothing stays installed. May be called again after `remove`."""
        self._forget()
        try:
            if self.port.attention is not None:
                self.port.attention.install(self.hooks)
            self.family.install_vision_side(self.model, self.port, self.hooks)
            self.generation.install(self.hooks, self.model)
            self.hooks.pre(self.parts.outer, self.entry.capture_input_ids)
            self.hooks.pre(self.parts.language_model, self.entry.enter_language_model)
            for index, layer in enumerate(self.parts.layers):
                self.hooks.pre(layer, self.layers.pre_hook(index))
            if self.router is not None:
                for index in range(self.schedule.routing.start_layer, len(self.parts.layers)):
                    self.hooks.post(self.parts.layers[index], self.router.post_hook(index))
        except BaseException:
            self.hooks.remove()
            raise

    def remove(self) -> None:
        self.hooks.remove()
        self.port.items, self.entry.visual_positions, self.sequence = {}, None, None

    def _forget(self) -> None:
        self.port.items, self.entry.visual_positions, self.sequence, self.stats, self.routes = {}, None, None, None, {}
