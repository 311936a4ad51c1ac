"""`compress(model, method)`: validate, install hooks on this model instance, hand back a handle."""
from __future__ import annotations

from typing import Any

import torch

from .models import family_for
from .runtime.session import Session
from .runtime.state import Stats

SUPPORTED_ATTENTION = ("sdpa", "eager")


class CompressionHandle:
    """Hooks of one method on one model instance; a context manager.

    `stats` describes the last compressed prefill (see `tokensieve.runtime.state.Stats`);
    `remove()` takes every hook and wrapper off, leaving the model exactly as it was.
    """

    def __init__(self, session: Session, method: Any) -> None:
        self._session = session
        self.method = method
        self.schedule = session.schedule

    @property
    def stats(self) -> Stats | None:
        return self._session.stats

    @property
    def active(self) -> bool:
        return self._session is not None and self._session.hooks is not None

    def remove(self) -> None:
        self._session.remove()

    def hold_selection(self, hold: bool = True) -> None:
        """Reuse the per-layer choice of the last prefill when the same prompt is run again longer
        (decoding without a cache recomputes the prompt plus the new tokens); for validation."""
        self._session.hold_routes = hold

    def __enter__(self) -> "CompressionHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _check_model(model: torch.nn.Module) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"compress expects a transformers model instance, got {type(model).__name__}")
    attention = getattr(model.config, "_attn_implementation", None)
    text_attention = getattr(model.config.get_text_config(), "_attn_implementation", attention)
    if text_attention not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {text_attention!r} is not supported yet; load the model with "
            f"attn_implementation='sdpa' or 'eager'"
        )


def compress(model: torch.nn.Module, method: Any) -> CompressionHandle:
    """Compress the visual tokens of `model` with `method` until the handle is removed.

    Everything is checked before the model is touched; on any error nothing stays installed.

    Args:
        model: a transformers VLM instance of a supported family (see `supported_model_types`).
        method: a method instance, e.g. `tokensieve.ApET(budget=64)`.
    Returns:
        A CompressionHandle, usable as a context manager.
    """
    family = family_for(model)
    _check_model(model)
    if not hasattr(method, "schedule"):
        raise ValueError(f"{type(method).__name__} is not a tokensieve method (e.g. tokensieve.ApET(budget=64))")
    family.check(model)
    parts = family.parts(model)
    context = {}
    if hasattr(method, "resolve_selectors"):
        context["selectors"] = method.resolve_selectors(model.config.model_type, parts.layers)
    schedule = method.schedule(len(parts.layers), family.apet_defaults, **context)
    nominal = family.nominal_tokens(model.config)
    if nominal is not None:
        schedule.check_item(nominal)
    session = Session(model, family, schedule)
    session.install()
    return CompressionHandle(session, method)
