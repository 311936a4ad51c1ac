"""Processors for checkpoints that take videos, built without torchvision.

In transformers 5.25 every video processor (Qwen2-VL's, Qwen3-VL's, Video-LLaVA's, LLaVA-NeXT-Video's,
LLaVA-OneVision's) is a torchvision backend, and a processor class that has a video processor can be
neither loaded (`AutoProcessor`) nor built without one. tokensieve does not depend on torchvision (the
build PyPI serves does not import beside a CPU torch), so for these model types the processor is
assembled here: the checkpoint's tokenizer, its image processor on the PIL backend, its chat template
and processor arguments, and a video processor of ours that applies the checkpoint's video settings
with PIL and numpy:

- LLaVA families: each frame as an image (shortest edge resized or a fixed size, centre crop,
  rescale, normalise): `pixel_values_videos` (V, F, 3, H, W);
- Qwen-VL: the frames resized to one size that fits the patch grid and the pixel limits (per frame on
  Qwen2/2.5-VL, per clip on Qwen3-VL), rescaled, normalised, padded to a multiple of the temporal patch
  by repeating the last frame, and cut into patches in the order the model reads them:
  `pixel_values_videos` (sum of t*h*w, 3 * temporal * patch * patch) and `video_grid_thw` (V, 3).

The processor class's own code then expands the placeholders (Qwen3-VL's frame timestamps included),
so prompts are the ones transformers would build. Resizing is PIL's bicubic, where the torchvision
processors resize tensors: pixels can differ slightly from a torchvision install's.
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# The video processors' defaults in transformers 5.25, for settings a checkpoint leaves out.
VIDEO_DEFAULTS = {
    "video_llava": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}},
    "llava_next_video": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}},
    "llava_onevision": {"size": {"height": 384, "width": 384}, "crop_size": None},
    "qwen2_vl": {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}, "patch_size": 14},
    "qwen2_5_vl": {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}, "patch_size": 14},
    "qwen3_vl": {"size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}, "patch_size": 16,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}
SHARED_DEFAULTS = {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "rescale_factor": 1 / 255,
                   "resample": PIL.Image.Resampling.BICUBIC, "temporal_patch_size": 2, "merge_size": 2}
SUB_PROCESSORS = ("image_processor", "video_processor", "tokenizer", "chat_template")


def load_processor(pretrained: str, model_type: str, image_options: dict):
    """The model type's transformers processor with a torchvision-free video processor.

    image_options: arguments for the image processor (e.g. min_pixels, max_pixels on Qwen-VL).
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])
    saved, _ = processor_class.get_processor_dict(pretrained)
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    image_processor = AutoImageProcessor.from_pretrained(pretrained, processor_config=saved.get("image_processor"),
                                                         backend="pil", **image_options)
    settings = video_settings(pretrained, model_type, saved)
    frames = QwenFrames(model_type, settings) if model_type in QWEN else LlavaFrames(settings)
    accepted = inspect.signature(processor_class.__init__).parameters
    arguments = {k: v for k, v in saved.items() if k in accepted and k not in SUB_PROCESSORS}
    return without_torchvision(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                                video_processor=frames,
                                                chat_template=saved.get("chat_template") or tokenizer.chat_template,
                                                **arguments)


def video_settings(pretrained: str, model_type: str, saved: dict) -> dict:
    """The video processor's settings: transformers' defaults, then the checkpoint's. As Qwen2/2.5-VL's
    video processor does, min_pixels and max_pixels, when given, set the size limits."""
    settings = {**SHARED_DEFAULTS, **VIDEO_DEFAULTS[model_type], **saved_video_settings(pretrained, saved)}
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        limits = {"shortest_edge": settings.pop("min_pixels", None), "longest_edge": settings.pop("max_pixels", None)}
        settings["size"] = {**settings["size"], **{k: v for k, v in limits.items() if v is not None}}
    return settings


def saved_video_settings(pretrained: str, saved: dict) -> dict:
    """The checkpoint's video processor settings: nested in processor_config.json (transformers 5), else
    video_preprocessor_config.json, else preprocessor_config.json (what transformers falls back to)."""
    if isinstance(saved.get("video_processor"), dict):
        return dict(saved["video_processor"])
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = Path(pretrained) / name
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def without_torchvision(processor_class):
    """A subclass of processor_class that accepts a video processor of ours (the class check looks for
    transformers' torchvision-backed base class, which cannot be imported without torchvision)."""
    class Processor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    Processor.__name__ = Processor.__qualname__ = processor_class.__name__
    return Processor


class VideoSettings:
    """What both video processors share: reading the settings, rescaling and normalising frames."""

    def __init__(self, settings: dict) -> None:
        self.settings = settings
        self.resample = PIL.Image.Resampling(settings["resample"])
        self.mean = np.asarray(settings["image_mean"], dtype=np.float32)[:, None, None]
        self.std = np.asarray(settings["image_std"], dtype=np.float32)[:, None, None]
        self.rescale_factor = float(settings["rescale_factor"])

    def normalised(self, frames: list[PIL.Image.Image]) -> np.ndarray:
        """(F, 3, H, W) float32 from F RGB frames of one size."""
        pixels = np.stack([np.asarray(frame.convert("RGB"), dtype=np.float32) for frame in frames])
        return (pixels.transpose(0, 3, 1, 2) * self.rescale_factor - self.mean) / self.std


def images_of(video: np.ndarray) -> list[PIL.Image.Image]:
    """(F, H, W, 3) uint8 -> F PIL images."""
    return [PIL.Image.fromarray(np.asarray(frame)) for frame in video]


class LlavaFrames(VideoSettings):
    """The LLaVA families' video processor: every frame as an image, (V, F, 3, H, W)."""

    def __call__(self, videos, return_tensors=None, **_) -> BatchFeature:
        frame_counts = {len(video) for video in videos}
        if len(frame_counts) > 1:
            raise ValueError(f"videos of {sorted(frame_counts)} frames in one call; this model takes one tensor of "
                             "videos, so every video of a batch needs the same frame count")
        return BatchFeature({"pixel_values_videos": np.stack([self.frames(video) for video in videos])},
                            tensor_type=return_tensors)

    def frames(self, video: np.ndarray) -> np.ndarray:
        images = [self.cropped(self.resized(image)) for image in images_of(video)]
        return self.normalised(images)

    def resized(self, image: PIL.Image.Image) -> PIL.Image.Image:
        size = self.settings["size"]
        if "shortest_edge" in size:
            width, height = image.size
            short = size["shortest_edge"]
            target = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        else:
            target = (size["width"], size["height"])
        return image.resize(target, self.resample)

    def cropped(self, image: PIL.Image.Image) -> PIL.Image.Image:
        crop = self.settings.get("crop_size")
        if not crop or self.settings.get("do_center_crop") is False:
            return image
        width, height = image.size
        left, top = (width - crop["width"]) // 2, (height - crop["height"]) // 2
        return image.crop((left, top, left + crop["width"], top + crop["height"]))


class QwenFrames(VideoSettings):
    """The Qwen-VL video processor: flattened patches and a (t, h, w) grid per video; the decoded
    videos' metadata passed on for the processor's timestamps (Qwen3-VL) and temporal positions (Qwen2.5-VL)."""

    def __init__(self, model_type: str, settings: dict) -> None:
        super().__init__(settings)
        if settings.get("cap_pixels_per_frame"):
            raise ValueError("this checkpoint's video processor sets cap_pixels_per_frame, which the tokensieve "
                             "lmms-eval model does not implement; remove it from its video processor config")
        self.per_clip = model_type == "qwen3_vl"
        self.patch, self.merge = int(settings["patch_size"]), int(settings["merge_size"])
        self.temporal = int(settings["temporal_patch_size"])
        self.merge_size = self.merge  # read by the processor class
        self.temporal_patch_size = self.temporal

    def __call__(self, videos, video_metadata=None, return_tensors=None, **_) -> BatchFeature:
        patches, grids = zip(*[self.patches(video) for video in videos])
        data = {"pixel_values_videos": np.concatenate(patches), "video_grid_thw": np.asarray(grids, dtype=np.int64)}
        if video_metadata is not None:
            data["video_metadata"] = list(video_metadata)
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["video_metadata"])

    def frame_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width): multiples of patch * merge within the pixel limits (of a frame, or of the clip
        counted in temporal patches on Qwen3-VL), the aspect ratio kept as closely as possible."""
        factor = self.patch * self.merge
        low, high = self.settings["size"]["shortest_edge"], self.settings["size"]["longest_edge"]
        if self.per_clip and min(height, width) < factor:
            scale = factor / min(height, width)
            height, width = int(height * scale), int(width * scale)
        depth = max(round(frames / self.temporal), 1) * self.temporal if self.per_clip else 1
        area = frames * height * width if self.per_clip else height * width
        h, w = round(height / factor) * factor, round(width / factor) * factor
        if depth * h * w > high:
            beta = math.sqrt(area / high)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif depth * h * w < low:
            beta = math.sqrt(low / area)
            h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        return h, w

    def patches(self, video: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(t*h*w, 3 * temporal * patch * patch) patches and the (t, h, w) grid of one (F, H, W, 3) video."""
        frames, height, width = video.shape[:3]
        h, w = self.frame_size(frames, height, width)
        pixels = self.normalised([image.resize((w, h), self.resample) for image in images_of(video)])
        pad = -len(pixels) % self.temporal
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
        t, gh, gw, m, p = len(pixels) // self.temporal, h // self.patch, w // self.patch, self.merge, self.patch
        blocks = pixels.reshape(t, self.temporal, 3, gh // m, m, p, gw // m, m, p)
        blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, gh/m, gw/m, m, m, 3, temporal, p, p)
        return blocks.reshape(t * gh * gw, 3 * self.temporal * p * p), (t, gh, gw)
