"""Dropping rows from a padded batch of sequences and applying that to every aligned tensor."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowSelection:
    """The result of keeping some rows of each sequence, left-padded to a common length.

    Attributes:
        gather_index: (B, S_new) long: old position of each new slot (0 at new padding slots).
        valid: (B, S_new) bool: False at new padding slots.
    """

    gather_index: torch.Tensor
    valid: torch.Tensor

    @property
    def length(self) -> int:
        return self.gather_index.shape[1]

    def gather(self, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """Apply the selection along `seq_dim` of x, whose dim `seq_dim - 1` is the batch (or 1).

        Works for hidden states (B, S, D), masks (B, S), position ids (B, S) or (R, B, S), and
        rotary tables (B, S, d). A broadcast batch dim of 1 is expanded first.
        """
        batch = self.gather_index.shape[0]
        seq_dim = seq_dim % x.dim()
        if x.shape[seq_dim - 1] != batch:
            shape = list(x.shape)
            shape[seq_dim - 1] = batch
            x = x.expand(shape)
        view = [1] * x.dim()
        view[seq_dim - 1], view[seq_dim] = batch, self.length
        index = self.gather_index.view(view).expand(*x.shape[: seq_dim], self.length, *x.shape[seq_dim + 1 :])
        return x.gather(seq_dim, index)

    def gather_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A 2-D attention mask (B, S) -> (B, S_new), zero at the new padding slots."""
        return self.gather(mask, 1) * self.valid.to(mask.dtype)


def compact_rows(keep: torch.Tensor, new_length: int | None = None) -> RowSelection:
    """Keep the True rows of each sequence, in order, left-padded to the longest.

    Args:
        keep: (B, S) bool.
        new_length: the largest kept count when the caller knows it (saves a device sync).
    Returns:
        RowSelection with S_new = max kept count; row b's kept rows fill its last count_b slots.
    """
    batch, length = keep.shape
    counts = keep.sum(dim=1)  # (B,)
    if new_length is None:
        new_length = int(counts.max()) if batch else 0
    kept_first = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept rows first, in order
    slots = torch.arange(new_length, device=keep.device).expand(batch, -1)
    padding = (new_length - counts)[:, None]
    valid = slots >= padding
    source = (slots - padding).clamp(min=0)
    gather_index = kept_first.gather(1, source).masked_fill(~valid, 0)
    return RowSelection(gather_index=gather_index, valid=valid)
