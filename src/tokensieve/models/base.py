"""What the runtime needs to know about a model family, and the shared defaults."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..ops.plan import ReductionPlan
from ..runtime.hooks import HookSet
from ..runtime.port import FamilyPort
from ..runtime.schedule import DecoderStage, Schedule, StageContext, StageRequest
from ..runtime.sequence import RowSelection
from .vision_attention import LayerAttention, VisionLayer


@dataclass(frozen=True)
class ModelParts:
    """Where things are in one model instance.

    Attributes:
        outer: the module that receives input_ids and merges the visual features (model.model).
        language_model: the decoder stack's module (model.model.language_model).
        layers: its decoder layers.
        text_config: the language model's config.
    """

    outer: torch.nn.Module
    language_model: torch.nn.Module
    layers: torch.nn.ModuleList
    text_config: Any


class Family:
    """A model family: where the visual tokens are made, and which placeholder tokens hold them.

    Subclasses set `model_types` and implement `install_vision_side`.
    """

    model_types: tuple[str, ...] = ()

    def parts(self, model: torch.nn.Module) -> ModelParts:
        outer = model.model
        language_model = outer.language_model
        return ModelParts(outer, language_model, language_model.layers, language_model.config)

    def token_ids(self, config: Any) -> dict[str, int]:
        """Placeholder token id of each modality, e.g. {"image": 32000}."""
        return {"image": config.image_token_id}

    def nominal_tokens(self, config: Any) -> int | None:
        """Visual tokens of one typical item, for checks made before any input is seen (None: unknown)."""
        return None

    def check(self, model: torch.nn.Module) -> None:
        """ValueError if this model instance cannot be compressed (called before anything is touched)."""

    def adapt_schedule(self, model: torch.nn.Module, schedule: Schedule) -> Schedule:
        """The schedule as this family runs it (ValueError where it cannot); unchanged by default."""
        return schedule

    def visual_positions(
        self, model: torch.nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> dict[str, torch.Tensor] | None:
        """(B, S) bool placeholder mask per modality, from input_ids or by matching embeddings."""
        ids = self.token_ids(model.config)
        if input_ids is not None:
            return {modality: input_ids == token for modality, token in ids.items()}
        if inputs_embeds is None:
            return None
        table = model.get_input_embeddings()
        positions = {}
        for modality, token in ids.items():
            row = table(torch.tensor(token, device=inputs_embeds.device)).to(inputs_embeds.dtype)
            positions[modality] = (inputs_embeds == row).all(-1)
        return positions

    def install_vision_side(self, model: torch.nn.Module, port: FamilyPort, hooks: HookSet) -> None:
        raise NotImplementedError

    def vision_feature_layer(self, model: torch.nn.Module) -> VisionLayer | None:
        """The vision layer behind the vision-side features, or None where this family names none. May
        raise ValueError saying why this model's layer cannot be read."""
        return None

    def vision_attention(self, model: torch.nn.Module) -> LayerAttention:
        """The reading of the vision layer behind the features, for a method that needs what that
        layer's attention says of them (`Schedule.reads_vision_attention`). The family then passes
        `sources` to `FamilyPort.plan_items`. ValueError where it names no such layer."""
        where = self.vision_feature_layer(model)
        if where is None:
            raise ValueError(
                "this method reads the attention of the vision encoder layer behind the visual features, and "
                f"tokensieve names no such layer for {model.config.model_type} models; it reads them on llava, "
                "llava_next, llava_next_video (images), video_llava, qwen2_vl, qwen2_5_vl and qwen3_vl"
            )
        return LayerAttention(where)

    def gather_language_kwargs(self, kwargs: dict, selection: RowSelection) -> None:
        """Apply the entry selection to family-specific language-model kwargs (in place)."""


@dataclass(frozen=True)
class ReducedPart:
    """One part of an item (an image, a crop, a video frame) after its vision-side plan.

    Attributes:
        n: the part's rows before reduction.
        plan: its ReductionPlan (kept_index (1, k), optional weights), or None when it keeps every row.
    """

    n: int
    plan: ReductionPlan | None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, D) -> (n, D): the plan's output at the kept rows and zeros elsewhere (x when kept whole).

        The zeros keep every tensor the model checks at its shape; the language model's entry drops them.
        """
        if self.plan is None:
            return x
        return scatter_rows(self.plan.apply(x[None]), self.plan.kept_index.to(x.device), self.n)[0]

    def keep(self, device: torch.device | None = None) -> torch.Tensor:
        """(n,) bool: the rows this part keeps."""
        if self.plan is None:
            return torch.ones(self.n, dtype=torch.bool, device=device)
        kept = self.plan.kept_index[0]
        return keep_mask(kept if device is None else kept.to(device), self.n)


def reduce_parts(port: FamilyPort, parts: list[torch.Tensor], keeps: list[int], modality: str = "image",
                 sources: list[torch.Tensor] | None = None) -> list[ReducedPart]:
    """The vision side's one sequence for every family: plan each (n_i, D) part to keeps[i] rows (parts
    of equal size together), ready to apply. sources: per part, (n_i,) long rows of the family's vision
    layer reading (when `port.reads_vision_attention`)."""
    plans = port.plan_items(parts, keeps, modality, sources)
    return [ReducedPart(x.shape[0], plan) for x, plan in zip(parts, plans)]


def square_grid(n: int) -> tuple[int, int] | None:
    side = int(round(n**0.5))
    return (side, side) if side * side == n else None


def scatter_rows(reduced: torch.Tensor, kept_index: torch.Tensor, n: int) -> torch.Tensor:
    """Put reduced (G, k, D) back at kept_index (G, k) of a zero (G, n, D) tensor."""
    full = reduced.new_zeros(reduced.shape[0], n, reduced.shape[-1])
    return full.scatter(1, kept_index[..., None].expand(-1, -1, reduced.shape[-1]), reduced)


def keep_mask(kept_index: torch.Tensor, n: int) -> torch.Tensor:
    """(k,) kept indices -> (n,) bool."""
    mask = torch.zeros(n, dtype=torch.bool, device=kept_index.device)
    mask[kept_index] = True
    return mask


def stage0_on_vision_side(schedule: Schedule) -> Schedule:
    """The schedule with its stage before decoder layer 0 run as the vision-side stage 1, when that
    stage reads only each item's own rows (`DecoderStage.vision_side`) and the schedule has no stage 1.

    The visual rows entering layer 0 are the features stage 1 sees, so the selection is the same.
    """
    first = schedule.stage_at(0)
    if first is None or not first.vision_side or schedule.vision_plan is not None:
        return schedule
    return replace(schedule, vision_keep=first.keep, vision_plan=_vision_side_plan(first), vision_plan_flops=first.flops,
                   stages=tuple(stage for stage in schedule.stages if stage is not first))


def _vision_side_plan(stage: DecoderStage):
    def plan(x: torch.Tensor, keep: int, evidence=None) -> ReductionPlan:
        """x (G, n, D) -> one plan of G rows keeping `keep` each, from the stage's own plan function."""
        positions = torch.arange(x.shape[1], device=x.device)
        requests = [StageRequest(item=g, row=g, positions=positions, keep=keep) for g in range(x.shape[0])]
        context = StageContext(layer=0, hidden=x, rotary=None, item=None, valid=None, layers=None, cache={})
        plans = stage.plan(context, requests)
        weights = None if plans[0].weights is None else torch.cat([p.weights for p in plans])
        return ReductionPlan(torch.cat([p.kept_index for p in plans]), weights)

    return plan
