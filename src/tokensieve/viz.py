"""Pictures of which visual tokens each stage kept: the image with dropped patches dimmed.

Figures are drawn with matplotlib (a dependency of the package) on their own Agg canvas, without
pyplot, so neither importing this module nor calling it changes matplotlib's global backend or
opens a window.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from PIL import Image

DIM = 0.3  # brightness of dropped patches
OUTLINE = (1.0, 1.0, 1.0, 0.75)  # white, slightly transparent
PANEL_INCHES = 3.0


def kept_grid(kept_index: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """(rows, cols) bool: True where the token (row-major index into the grid) was kept."""
    rows, cols = grid
    mask = np.zeros(rows * cols, dtype=bool)
    index = kept_index.detach().cpu().long().numpy()
    if index.size and (index.min() < 0 or index.max() >= rows * cols):
        raise ValueError(f"kept indices must lie in [0, {rows * cols}) for a {rows}x{cols} grid")
    mask[index] = True
    return mask.reshape(rows, cols)


def dimmed(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] with the pixels of dropped grid cells darkened.

    keep: (rows, cols) bool; each cell covers an equal share of the image (rounded down).
    """
    height, width = image.shape[:2]
    rows, cols = keep.shape
    cell_rows = np.minimum(np.arange(height) * rows // height, rows - 1)
    cell_cols = np.minimum(np.arange(width) * cols // width, cols - 1)
    pixel_keep = keep[cell_rows[:, None], cell_cols[None, :]]
    return np.where(pixel_keep[..., None], image, image * DIM)


def stage_title(stage: str, count: int, total: int) -> str:
    """'stage 1: 96 of 576 kept' for stage 'stage1'."""
    name = stage.replace("stage", "stage ") if stage.startswith("stage") else stage
    return f"{name}: {count} of {total} kept"


def _outline(ax, keep: np.ndarray) -> None:
    """Draw the border of every kept cell in image-grid coordinates (cell = unit square)."""
    cells = [
        [(c, r), (c + 1, r), (c + 1, r + 1), (c, r + 1)]
        for r, c in zip(*np.nonzero(keep))
    ]
    ax.add_collection(PolyCollection(cells, facecolors="none", edgecolors=OUTLINE, linewidths=0.5))


def _draw_panel(ax, picture: np.ndarray, grid: tuple[int, int], keep: np.ndarray | None, title: str) -> None:
    rows, cols = grid
    shown = picture if keep is None else dimmed(picture, keep)
    ax.imshow(shown, extent=(0, cols, rows, 0), interpolation="nearest")
    if keep is not None:
        _outline(ax, keep)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def agg_figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global backend change)."""
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str | Path, dpi: int) -> Path:
    """Lay the figure out tightly and write it as PNG to path (folders are created); returns the path."""
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def kept_overlay_rows(
    image: Image.Image,
    grid: tuple[int, int],
    rows: Sequence[tuple[str, dict[str, torch.Tensor]]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Write one PNG: a row per method, a panel per stage ("input", then each stage in order).

    Args:
        image: the picture the tokens came from (any size; each token covers an equal cell).
        grid: (rows, cols) of the item's token grid, row-major (e.g. (24, 24) for 576 tokens).
        rows: (label, kept) per figure row; kept maps stage name -> (k,) long token indices,
            as one entry of `handle.stats.kept`. The label names the row (e.g. "ApET 64").
        path: the PNG to write (folders are created).
        title: optional figure title.
    Returns:
        The path written.
    """
    if not rows:
        raise ValueError("kept_overlay_rows needs at least one (label, kept) row")
    picture = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    total = grid[0] * grid[1]
    columns = 1 + max(len(kept) for _, kept in rows)
    figure = agg_figure(PANEL_INCHES * columns, PANEL_INCHES * len(rows) + 0.4)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for axes_row, (label, kept) in zip(axes, rows):
        _draw_panel(axes_row[0], picture, grid, None, f"input: {total} tokens")
        axes_row[0].set_ylabel(label, fontsize=12, fontweight="bold")
        for ax, (stage, index) in zip(axes_row[1:], kept.items()):
            _draw_panel(ax, picture, grid, kept_grid(index, grid), stage_title(stage, index.numel(), total))
        for ax in axes_row[1 + len(kept):]:
            ax.axis("off")
    if title:
        figure.suptitle(title, fontsize=12)
    return save_figure(figure, path, dpi=100)


def kept_overlay(image: Image.Image, grid: tuple[int, int], kept: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write one PNG with a panel per stage: "input", then each stage of `kept` (see kept_overlay_rows)."""
    return kept_overlay_rows(image, grid, [("", kept)], path)
