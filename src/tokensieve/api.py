"""`compress(model, method)`: validate, install hooks on this model instance, hand back a handle."""
from __future__ import annotations

import weakref
from typing import Any

import torch

from .models import family_for
from .runtime.schedule import Method, NeedsSelectors
from .runtime.session import Session
from .runtime.state import Stats

# Attention implementations the test suite runs every method and family under (docs/flash-attention.md):
# FlashAttention-2 and -3 take transformers' one FlashAttention path, tested on a CPU with stand-in kernels.
SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


_INSTALLED: "weakref.WeakKeyDictionary[torch.nn.Module, CompressionHandle]" = weakref.WeakKeyDictionary()


class CompressionHandle:
    """Hooks of one method on one model instance; a context manager.

    `stats` describes the last compressed prefill (see `tokensieve.runtime.state.Stats`);
    `remove()` takes every hook and wrapper off, leaving the model exactly as it was. A removed
    handle installs itself again when a `with` block enters it (with fresh stats).
    """

    def __init__(self, session: Session, method: Any) -> None:
        self._session = session
        self.method = method
        self.schedule = session.schedule
        self._in_block = False

    @property
    def stats(self) -> Stats | None:
        return self._session.stats

    @property
    def active(self) -> bool:
        """Whether this handle's hooks are on the model now."""
        return self._session.hooks.installed

    def remove(self) -> None:
        self._session.remove()
        if _INSTALLED.get(self._session.model) is self:
            del _INSTALLED[self._session.model]

    def hold_selection(self, hold: bool = True) -> None:
        """Reuse the per-layer choice of the last prefill when the same prompt is run again longer
        (decoding without a cache recomputes the prompt plus the new tokens); for validation."""
        self._session.hold_routes = hold

    def _install(self) -> None:
        _check_not_compressed(self._session.model)
        self._session.install()
        _INSTALLED[self._session.model] = self

    def __enter__(self) -> "CompressionHandle":
        if self._in_block:
            raise RuntimeError("this handle's with block is already open; nest no second block on the same handle")
        if not self.active:
            self._install()
        self._in_block = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._in_block = False
        self.remove()


def _check_not_compressed(model: torch.nn.Module) -> None:
    installed = _INSTALLED.get(model)
    if installed is not None and installed.active:
        raise ValueError(
            f"this model is already compressed with {installed.method!r}; remove that handle first "
            "(handle.remove(), or leave its with block) or compress a separately loaded model"
        )


def _check_model(model: torch.nn.Module) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compress expects a transformers model instance, got {type(model).__name__}")
    if model.get_output_embeddings() is None:
        raise ValueError(
            f"compress expects the whole generative model (e.g. LlavaForConditionalGeneration), got its inner "
            f"{type(model).__name__}; pass the object from_pretrained returned"
        )
    for name, attention in _attention_implementations(model.config):
        if attention not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attention implementation {attention!r} ({name}) is not supported; load the model with "
                f"attn_implementation set to one of {', '.join(repr(a) for a in SUPPORTED_ATTENTION)}"
            )


def _attention_implementations(config, name: str = "config") -> list[tuple[str, str | None]]:
    """(where, implementation) of a config and each of its sub-configs (text, vision, ...), recursively."""
    found = [(name, getattr(config, "_attn_implementation", None))]
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            found += _attention_implementations(sub, key)
    return found


def _check_method(method: Any) -> None:
    if isinstance(method, type):
        raise TypeError(f"pass a method instance, not the class: e.g. tokensieve.{method.__name__}(budget=64)")
    if not isinstance(method, Method):
        raise TypeError(f"{type(method).__name__} is not a tokensieve method (e.g. tokensieve.ApET(budget=64))")


def compress(model: torch.nn.Module, method: Any) -> CompressionHandle:
    """Compress the visual tokens of `model` with `method` until the handle is removed.

    Everything is checked before the model is touched; on any error nothing stays installed.
    A model carries one handle at a time: a second `compress` before the first is removed raises.

    Args:
        model: a transformers VLM instance of a supported family (see `supported_model_types`).
        method: a method instance, e.g. `tokensieve.ApET(budget=64)`.
    Returns:
        A CompressionHandle, usable as a context manager.
    """
    _check_method(method)
    family = family_for(model)
    _check_model(model)
    _check_not_compressed(model)
    family.check(model)
    parts = family.parts(model)
    context = {}
    if isinstance(method, NeedsSelectors):
        context["selectors"] = method.resolve_selectors(model.config.model_type, parts.layers)
    schedule = family.adapt_schedule(model, method.schedule(len(parts.layers), model.config.model_type, **context))
    nominal = family.nominal_tokens(model.config)
    if nominal is not None:
        schedule.check_item(nominal)
    attention = family.vision_attention(model) if schedule.reads_vision_attention else None
    handle = CompressionHandle(Session(model, family, schedule, attention), method)
    handle._install()
    return handle
