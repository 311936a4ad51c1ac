"""A document's visuals as the tokensieve lmms-eval model reads them: images, and videos decoded into frames.

lmms-eval's image tasks hand over PIL images; its video tasks hand over file paths. A video is decoded
with decord into `max_frames` frames spaced uniformly over the clip (all of them when it has fewer),
as lmms-eval's own HF wrappers sample: `np.linspace(0, frames - 1, count)` rounded down.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
from transformers.video_utils import VideoMetadata


@dataclass
class Video:
    """frames: (F, H, W, 3) uint8; metadata: the clip's frame count and rate, and the frames taken."""

    frames: np.ndarray
    metadata: VideoMetadata
    path: str


def read_video(path: str, max_frames: int) -> Video:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    total = len(reader)
    indices = np.linspace(0, total - 1, min(max_frames, total), dtype=int)
    frames = reader.get_batch(indices.tolist()).asnumpy()
    fps = float(reader.get_avg_fps())
    metadata = VideoMetadata(total_num_frames=total, fps=fps, width=frames.shape[2], height=frames.shape[1],
                             duration=total / fps, video_backend="decord", frames_indices=indices.tolist())
    return Video(frames, metadata, path)


def load_visuals(visuals: list, max_frames: int) -> list[PIL.Image.Image | Video]:
    """A document's visuals: PIL images as they are, video paths decoded; ValueError for anything else."""
    loaded = []
    for visual in visuals:
        if isinstance(visual, PIL.Image.Image):
            loaded.append(visual)
        elif isinstance(visual, str):
            loaded.append(read_video(visual, max_frames))
        else:
            raise ValueError(f"the tokensieve lmms-eval model takes images (PIL) and videos (file paths); this task "
                             f"gives a {type(visual).__name__}")
    return loaded


def images_in(visuals: list) -> list[PIL.Image.Image]:
    return [v for v in visuals if isinstance(v, PIL.Image.Image)]


def videos_in(visuals: list) -> list[Video]:
    return [v for v in visuals if isinstance(v, Video)]
