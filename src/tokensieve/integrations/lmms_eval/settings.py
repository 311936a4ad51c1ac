"""The `tokensieve` lmms-eval model's arguments, checked before any weights are loaded.

lmms-eval hands model arguments over as `key=value` pairs, already turned into bool, int, float or
str. `resolve` checks the checkpoint (a local folder holding config.json, or a hub id), its
model type, the method's name and its fields, and builds the method, so every mistake is a
ValueError that says what to fix before the model is read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import registry
from ...smallvlm.calibrate import SELECTORS

UNCOMPRESSED = "none"
# The LLaVA families are prompted the way lmms-eval's `llava_hf` prompts, the Qwen-VL families the way its
# Qwen wrappers do (prompts.py), so `method=none` reproduces those wrappers' prompts.
LLAVA_MODEL_TYPES = ("llava", "llava_next", "llava_onevision", "video_llava", "llava_next_video")
QWEN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
MODEL_TYPES = LLAVA_MODEL_TYPES + QWEN_MODEL_TYPES
VIDEO_MODEL_TYPES = ("llava_onevision", "video_llava", "llava_next_video") + QWEN_MODEL_TYPES
DEFAULT_FRAMES = 8  # Video-LLaVA's frame count


@dataclass(frozen=True)
class Settings:
    """What one run evaluates: the checkpoint, its model type and the method (None: uncompressed)."""

    pretrained: str
    model_type: str
    method_name: str
    method: Any

    @property
    def label(self) -> str:
        """'none', or the method with its fields, e.g. ApET(budget=64, ...)."""
        return UNCOMPRESSED if self.method is None else repr(self.method)


def resolve(pretrained: str, method: str, method_fields: dict[str, Any]) -> Settings:
    """The run's settings; ValueError naming what is wrong (nothing is loaded but the config)."""
    model_type = checkpoint_model_type(str(pretrained))
    name = str(method)
    if name.lower() == UNCOMPRESSED:
        if method_fields:
            raise ValueError(f"method=none runs the model uncompressed and takes no method fields; got "
                             f"{', '.join(sorted(method_fields))}: give a method, e.g. method=apet,budget=64")
        return Settings(str(pretrained), model_type, UNCOMPRESSED, None)
    entry = method_entry(name)
    fields = {k: method_value(v) for k, v in method_fields.items()}
    check_field_names(entry, fields)
    default_selectors(entry, fields, str(pretrained))
    try:
        instance = entry.cls(**fields)
    except TypeError as error:
        raise ValueError(f"{entry.name}: {error}") from None
    return Settings(str(pretrained), model_type, entry.name, instance)


def image_options(model_type: str, max_frames_num, min_pixels, max_pixels) -> dict:
    """The image processor's pixel limits ({} unless given), the frame count checked too; ValueError for a
    frame count or limit that is not a positive integer, limits on a model type that has none, or
    min_pixels above max_pixels."""
    for name, value in (("max_frames_num", max_frames_num), ("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    limits = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    if limits and model_type not in QWEN_MODEL_TYPES:
        raise ValueError(f"{', '.join(limits)} set the image resolution of Qwen-VL checkpoints "
                         f"({', '.join(QWEN_MODEL_TYPES)}); this checkpoint is {model_type}: leave them out")
    if len(limits) == 2 and min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} is above max_pixels={max_pixels}")
    return limits


def method_entry(name: str) -> registry.MethodEntry:
    try:
        return registry.entry(name)
    except ValueError:
        raise ValueError(f"unknown method {name!r}; choose among {UNCOMPRESSED} (uncompressed), "
                         f"{', '.join(registry.method_names())}") from None


def method_value(value: Any) -> Any:
    """'none' -> None; an integral float (lmms-eval reads '-1' as -1.0) -> int; anything else as given."""
    if isinstance(value, str) and value.lower() == "none":
        return None
    if isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
        return int(value)
    return value


def check_field_names(entry: registry.MethodEntry, fields: dict[str, Any]) -> None:
    known = [f.name for f in dataclasses.fields(entry.cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{entry.name} has no field {', '.join(unknown)}; its fields: {', '.join(known)} "
                         "(the model's own arguments: pretrained, method, dtype, attn_implementation, device_map, "
                         "device, batch_size, chat_template, max_frames_num, min_pixels, max_pixels, system_prompt, "
                         "stats_file)")


def default_selectors(entry: registry.MethodEntry, fields: dict[str, Any], pretrained: str) -> None:
    """ALVTS without selectors= takes the calibrated selectors saved beside the checkpoint, if any."""
    beside = Path(pretrained) / SELECTORS
    if "selectors" in [f.name for f in dataclasses.fields(entry.cls)] and "selectors" not in fields and beside.is_file():
        fields["selectors"] = str(beside)


def checkpoint_model_type(pretrained: str) -> str:
    """The model type of a local checkpoint folder or a hub id; ValueError for a missing folder or an
    unsupported model type."""
    folder = Path(pretrained).expanduser()
    if folder.exists() or not looks_like_hub_id(pretrained):
        if not folder.is_dir():
            raise ValueError(f"checkpoint folder {pretrained} does not exist; give pretrained= a folder written by "
                             "save_pretrained (or a hub id such as llava-hf/llava-1.5-7b-hf)")
        if not (folder / "config.json").is_file():
            raise ValueError(f"{pretrained} holds no config.json, so no saved model; give pretrained= a folder "
                             "written by save_pretrained")
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(pretrained).model_type
    if model_type not in MODEL_TYPES:  # every family tokensieve compresses
        raise ValueError(f"model_type {model_type!r} of {pretrained} is not supported by the tokensieve lmms-eval "
                         f"model; supported model_types: {', '.join(MODEL_TYPES)}")
    return model_type


def looks_like_hub_id(text: str) -> bool:
    """'org/name' with no path-like start: a model to fetch by name rather than a local folder."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~", "/"))
