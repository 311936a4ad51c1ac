"""Videos of the LLaVA families: F frames of R rows each, every frame reduced on its own.

A frame is reduced spatially, never across frames: its budgeted rows keep `port.keep(R - lead)`, the
same count as an image of that many tokens. Structural rows are pinned (every stage keeps them and no
budget counts them): `lead` rows opening every frame (Video-LLaVA hands each frame's CLS token to the
language model) and `trail` rows after the last frame (LLaVA-OneVision's video newline). A video is
one `VisualItem` with one segment per frame, so decoder stages and routing act per frame too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..runtime.port import FamilyPort
from ..runtime.state import VisualItem
from .base import reduce_parts


@dataclass(frozen=True)
class FrameLayout:
    """Where a video's frames lie among its placeholder tokens.

    Attributes:
        frames: F, the frames of each video.
        rows: R, the rows of one frame as the language model receives them (`lead` included).
        lead: pinned rows at the start of every frame.
        trail: pinned rows after the last frame.
    """

    frames: int
    rows: int
    lead: int = 0
    trail: int = 0

    @property
    def length(self) -> int:
        """Placeholder tokens of one video: F * R + trail."""
        return self.frames * self.rows + self.trail

    def pinned(self) -> torch.Tensor:
        """(length,) bool: the lead rows of every frame and the trailing rows."""
        pinned = torch.zeros(self.frames, self.rows, dtype=torch.bool)
        pinned[:, : self.lead] = True
        return torch.cat([pinned.flatten(), torch.ones(self.trail, dtype=torch.bool)])

    def segments(self) -> tuple[int, ...]:
        """One segment per frame; the trailing rows belong to the last frame's (pinned, so never budgeted)."""
        return (self.rows,) * (self.frames - 1) + (self.rows + self.trail,)


def reduce_videos(port: FamilyPort, videos: torch.Tensor, layout: FrameLayout,
                  sources: Callable[[int, int], torch.Tensor] | None = None) -> torch.Tensor:
    """Reduce every frame of one encoding's videos and record one VisualItem per video.

    Args:
        port: the family's port; this call is one encoding of the "video" modality.
        videos: (V, F, R, D) frame rows (any width: vision features or projected ones).
        layout: the frames' layout (F and R must match `videos`).
        sources: (video, frame) -> (R - lead,) long rows of the family's vision-layer reading that the
            frame's budgeted rows came from; needed when `port.reads_vision_attention`.
    Returns:
        (V, F, R, D): each frame's plan output at its kept rows, zeros at its dropped rows, pinned rows as
        they were (`videos` itself when no frame was reduced).
    """
    count, frames, rows = videos.shape[:3]
    if (frames, rows) != (layout.frames, layout.rows):
        raise RuntimeError(f"videos of {frames} frames x {rows} rows, but the layout expects "
                           f"{layout.frames} x {layout.rows}; this transformers version lays videos out differently")
    lead = layout.lead
    port.begin_items("video")
    parts = [videos[v, f, lead:] for v in range(count) for f in range(frames)]
    where = None if sources is None else [sources(v, f) for v in range(count) for f in range(frames)]
    reduced = reduce_parts(port, parts, [port.keep(rows - lead)] * len(parts), "video", where)
    pinned = layout.pinned().to(videos.device)
    for v in range(count):
        keep = pinned.clone()
        for f in range(frames):
            keep[f * rows + lead : (f + 1) * rows] = reduced[v * frames + f].keep(videos.device)
        port.add_item(VisualItem("video", keep, pinned=pinned, segments=layout.segments()))
    if all(part.plan is None for part in reduced):
        return videos
    out = videos.clone()
    for j, (x, part) in enumerate(zip(parts, reduced)):
        out[j // frames, j % frames, lead:] = part.apply(x)
    return out


def refuse_vision_attention(port: FamilyPort, why: str) -> None:
    """ValueError, before the video is encoded, when the method reads the vision attention (the rows the
    language model receives are `why`, no vision layer's rows)."""
    if port.reads_vision_attention:
        raise ValueError(
            "this method reads the attention of the vision encoder layer behind each visual feature, and this "
            f"model's video rows are {why}, so no encoder layer's rows; run video prompts without this method "
            "(images are supported)"
        )


def pooled_video_wrapper(port: FamilyPort, trail: int, why: str) -> Callable[[Callable], Callable]:
    """A wrapper factory for `get_video_features` of the families whose videos reach the language model
    as pooled, projected frames: pooler_output (V, F * R + trail, D_text) (R pooled rows per frame, `trail`
    pinned rows after the last frame). Every frame is reduced there, in the projected space, so the
    budget counts the tokens the language model receives. A method that reads the vision attention is
    refused before the video is encoded (`why`: what the pooled rows are)."""

    def make_wrapper(original: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            refuse_vision_attention(port, why)
            pixels = kwargs.get("pixel_values_videos", args[0] if args else None)  # (V, F, C, H, W)
            as_tuple = kwargs.get("return_dict") is False
            output = original(*args, **{**kwargs, "return_dict": True})
            output.pooler_output = _reduce_pooled(port, output.pooler_output, pixels.shape[1], trail)
            return output.to_tuple() if as_tuple else output

        return wrapper

    return make_wrapper


def _reduce_pooled(port: FamilyPort, features: torch.Tensor, frames: int, trail: int) -> torch.Tensor:
    """(V, F * R + trail, D) -> the same, each of the F frames of R rows reduced on its own."""
    count, length, width = features.shape
    rows = (length - trail) // frames
    if rows * frames + trail != length:
        raise RuntimeError(f"a video of {frames} frames came back as {length} rows, not {frames} x R + {trail}; "
                           "this transformers version lays videos out differently")
    videos = features[:, : frames * rows].unflatten(1, (frames, rows))
    reduced = reduce_videos(port, videos, FrameLayout(frames=frames, rows=rows, trail=trail))
    if reduced is videos:
        return features
    return torch.cat([reduced.flatten(1, 2), features[:, frames * rows :]], dim=1)
