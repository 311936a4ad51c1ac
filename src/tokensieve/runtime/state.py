"""What the runtime remembers between the vision side, the language model's layers and decoding."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from .sequence import RowSelection, compact_rows


@dataclass
class VisualItem:
    """One image (or video) as the language model sees it: its run of placeholder tokens.

    Attributes:
        modality: "image" or "video".
        keep: (n,) bool over the item's n placeholder tokens: kept by stage 1.
        pinned: (n,) bool or None: structural tokens (image newlines) every stage keeps.
        budget_tokens: token count the budget is measured against (n less the pinned tokens).
        grid: (rows, cols) of the token grid where the item is one plain grid, for pictures.
        segments: lengths of consecutive slot runs that are budgeted and reduced separately (a
            video's frames, pinned rows such as a frame's CLS token included); None: the whole item
            is one segment.
        floored: names of the stages that kept the method's minimum (or the whole item, when smaller)
            because the budget asked for fewer tokens than the method can reduce to.
    """

    modality: str
    keep: torch.Tensor
    pinned: torch.Tensor | None = None
    budget_tokens: int | None = None
    grid: tuple[int, int] | None = None
    segments: tuple[int, ...] | None = None
    floored: set[str] = field(default_factory=set)

    def spans(self) -> list[tuple[int, int, int]]:
        """(first slot, slot count, budget tokens) of each separately reduced segment; a segment's
        budget counts its slots less the pinned ones."""
        if self.segments is None:
            return [(0, self.keep.numel(), self.budget_tokens)]
        starts = [sum(self.segments[:i]) for i in range(len(self.segments))]
        return [(start, length, length - self._pinned_in(start, length)) for start, length in zip(starts, self.segments)]

    def _pinned_in(self, start: int, length: int) -> int:
        return 0 if self.pinned is None else int(self.pinned[start : start + length].sum())

    def __post_init__(self) -> None:
        if self.budget_tokens is None:
            pinned = 0 if self.pinned is None else int(self.pinned.sum())
            self.budget_tokens = self.keep.numel() - pinned


@dataclass
class ItemRows:
    """Where one visual item's rows lie in a level. Tensor sizes are host metadata, so code that knows
    these needs no read back from the device.

    Attributes:
        batch_row: the batch row holding the item.
        spans: per span of the item (`VisualItem.spans`), the increasing positions of its unpinned rows.
        pinned: the positions of its pinned rows.
    """

    batch_row: int
    spans: list[torch.Tensor]
    pinned: torch.Tensor

    @property
    def unpinned(self) -> torch.Tensor:
        return torch.cat(self.spans)

    def moved(self, new_position: torch.Tensor, kept_spans: dict[int, torch.Tensor]) -> "ItemRows":
        """The rows in the next level: `new_position` (B, S) maps this level's rows to the next one's,
        `kept_spans` gives the rows a stage kept of each span it reduced (the others keep all)."""
        row = new_position[self.batch_row]
        spans = [row[kept_spans.get(s, p)].sort().values for s, p in enumerate(self.spans)]
        return ItemRows(self.batch_row, spans, row[self.pinned])


@dataclass(eq=False)
class Level:
    """The sequence seen by decoder layers first_layer.. (until the next level).

    Attributes:
        first_layer: index of the first decoder layer that sees this sequence.
        selection: rows kept from the previous level (or from the input, for level 0).
        item: (B, S_l) long: the visual item each row belongs to, -1 for text.
        slot: (B, S_l) long: the row's index among its item's placeholder tokens.
        pinned: (B, S_l) bool: rows no stage may drop.
        mask: (B, S_l) the 2-D attention mask of the prefill rows.
    """

    first_layer: int
    selection: RowSelection
    item: torch.Tensor
    slot: torch.Tensor
    pinned: torch.Tensor
    mask: torch.Tensor
    layer_mask: object = None  # 4-D mask (or None) built at first_layer for the current forward
    rotary: tuple | None = None  # (source, gathered) position embeddings of the current forward
    rows: list[ItemRows] | None = None  # per item, where its rows lie (`locate`, or given by a stage)
    _count: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.item.shape[1]

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) visual rows and (B,) non-padding rows each batch row holds here (CPU, computed once)."""
        if self._count is None:
            valid = self.selection.valid & self.mask.bool()
            visual = (self.item >= 0) & valid
            self._count = torch.stack([visual.sum(1), valid.sum(1), (visual & self.pinned).sum(1),
                                       ((self.item < 0) | self.pinned).sum(1)]).cpu()
        return self._count[0], self._count[1]

    def padded(self) -> bool:
        """Whether any row here is padding (from `counts`, on the host)."""
        _, rows = self.counts()
        return min(rows.tolist()) < self.length

    def fixed_counts(self) -> tuple[list[int], list[int]]:
        """Per batch row: pinned visual rows, and rows no selection drops (text, padding, pinned)."""
        self.counts()
        return self._count[2].tolist(), self._count[3].tolist()

    def locate(self, items: list[VisualItem], batch_rows: list[int]) -> list[ItemRows]:
        """Where each item's rows lie here, read back once (at the prefill's entry, not in a layer)."""
        if self.rows is None:
            self.rows = []
            for i, (item, b) in enumerate(zip(items, batch_rows)):
                own, slot = self.item[b] == i, self.slot[b]
                free = own & ~self.pinned[b]
                spans = [(free & (slot >= start) & (slot < start + length)).nonzero().flatten()
                         for start, length, _ in item.spans()]
                self.rows.append(ItemRows(b, spans, (own & self.pinned[b]).nonzero().flatten()))
        return self.rows

    @staticmethod
    def select(selection: RowSelection, item: torch.Tensor, slot: torch.Tensor, pinned: torch.Tensor,
               mask: torch.Tensor) -> "Level":
        """Level 0: these rows of the input, whose (B, S) bookkeeping tensors are given."""
        return Level(
            first_layer=0,
            selection=selection,
            item=selection.gather(item, 1).masked_fill(~selection.valid, -1),
            slot=selection.gather(slot, 1),
            pinned=selection.gather(pinned, 1) & selection.valid,
            mask=selection.gather_mask(mask),
        )

    def narrowed(self, keep: torch.Tensor, first_layer: int, kept_spans: list[dict[int, torch.Tensor]]) -> "Level":
        """The next level: the `keep` (B, S) rows of this one, where a stage kept `kept_spans[i][s]` of
        item i's span s. Its counts, length and item rows follow on the host from this level's: nothing
        is read back from the device."""
        rows = self.rows
        dropped = [0] * keep.shape[0]
        for item_rows, kept in zip(rows, kept_spans):
            dropped[item_rows.batch_row] += sum(item_rows.spans[s].numel() - k.numel() for s, k in kept.items())
        selection = compact_rows(keep, self.length - min(dropped))
        level = Level.select(selection, self.item, self.slot, self.pinned, self.mask)
        level.first_layer = first_layer
        lost = torch.tensor(dropped)
        self.counts()
        level._count = self._count - torch.stack([lost, lost, torch.zeros_like(lost), torch.zeros_like(lost)])
        new_position = keep.cumsum(1) - 1 + (selection.length - keep.sum(1, keepdim=True))  # (B, S) row in the next level
        level.rows = [r.moved(new_position, kept) for r, kept in zip(rows, kept_spans)]
        return level


@dataclass
class SequenceState:
    """A compressed prefill and the decoding that follows it on the same cache."""

    original_length: int
    levels: list[Level]
    items: list[VisualItem]
    decoded: int = 0
    applied: set = field(default_factory=set)  # names of the inner stages run in this prefill
    new_columns: torch.Tensor | None = None  # (B, decoded + q) mask columns past the prefill

    def level_of(self, layer: int) -> Level:
        return [level for level in self.levels if level.first_layer <= layer][-1]


@dataclass
class Stats:
    """What the last compressed prefill did, per batch row and per visual item.

    Attributes:
        tokens_per_layer: (B, L) long: visual tokens each decoder layer processed, counted on the
            hidden states each layer actually received.
        rows_per_layer: (B, L) long: all non-padding rows (text + visual) each layer processed.
        kept: one dict per visual item (in sequence order): stage name -> (k,) long indices of the
            item's placeholder tokens that stage kept (over all frames of a video; `kept_per_frame`
            counts them per frame).
        rows: the batch row of each visual item.
        items: the VisualItem records (modality, grid, ...).
        selection_flops: FLOPs the method itself spent choosing (stage-1 plans of the last
            encoding, stage-2 plans, per-layer selectors).
        plans: the kept indices of every plan the prefill asked for, in call order, each with its
            (stage, input size, kept count): what `Replay.from_handle` replays.
        widths: the language model's widths, for `decoder_flops`.
        positions: (B, S_out) long: the input position of each row of the model's output (logits,
            hidden states), -1 at padding rows the compaction added. The last row is always each
            prompt's last token; `(positions == p).nonzero()` finds where input position p went, if kept.
    """

    tokens_per_layer: torch.Tensor
    rows_per_layer: torch.Tensor
    kept: list[dict[str, torch.Tensor]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    items: list[VisualItem] = field(default_factory=list)

    selection_flops: int = 0
    widths: object = None
    plans: list[tuple[tuple[str, int, int], torch.Tensor]] = field(default_factory=list)
    positions: torch.Tensor | None = None

    def items_per_row(self, batch: int) -> list[int]:
        """How many visual items each of the `batch` rows holds."""
        counts = Counter(self.rows)
        return [counts[row] for row in range(batch)]

    @property
    def decoder_flops(self) -> int:
        """Analytic prefill FLOPs of the decoder layers over the batch (see tokensieve.flops)."""
        from ..flops import decoder_layer_flops

        return sum(decoder_layer_flops(self.widths, int(rows)) for rows in self.rows_per_layer.flatten())

    @property
    def selection_share(self) -> float:
        """The selection's FLOPs as a fraction of the decoder's plus the selection's."""
        return self.selection_flops / max(1, self.selection_flops + self.decoder_flops)

    @property
    def floored(self) -> list[list[str]]:
        """Per visual item, the stages that kept the method's minimum instead of the budget's count."""
        return [sorted(item.floored) for item in self.items]

    def kept_per_frame(self, stage: str = "stage1") -> list[list[int]]:
        """Per visual item, the tokens `stage` kept in each of its frames (a video's segments; one entry
        for an image), pinned tokens (a frame's CLS, newlines) not counted. `stage`: "stage1", a decoder
        stage's name ("stage2", "fastv", ...), or "layer{l}" for a routed layer l."""
        counts = []
        for item, kept in zip(self.items, self.kept):
            if stage not in kept:
                raise ValueError(f"no stage {stage!r} in this prefill; its stages are {sorted(kept)}")
            chosen = torch.zeros(item.keep.numel(), dtype=torch.bool)
            chosen[kept[stage].cpu()] = True
            if item.pinned is not None:
                chosen &= ~item.pinned.cpu()
            counts.append([int(chosen[start : start + length].sum()) for start, length, _ in item.spans()])
        return counts

    @property
    def mean_tokens_per_layer(self) -> torch.Tensor:
        """(B,) float: visual tokens per decoder layer, averaged over the layers."""
        return self.tokens_per_layer.float().mean(dim=1)
