"""Hooks and method wrappers that live on one model instance and are all removed together."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch


class HookSet:
    """Registers forward hooks and instance-level method wrappers; `remove()` undoes all of them."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._wrapped: list[tuple[Any, str]] = []

    def pre(self, module: torch.nn.Module, fn: Callable) -> None:
        """fn(module, args, kwargs) -> None or (args, kwargs)."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, module: torch.nn.Module, fn: Callable) -> None:
        """fn(module, args, kwargs, output) -> None or a replacement output."""
        self._handles.append(module.register_forward_hook(fn, with_kwargs=True))

    def wrap_method(self, obj: Any, name: str, make_wrapper: Callable[[Callable], Callable]) -> None:
        """Shadow obj.name with make_wrapper(original) on this instance only (signature preserved)."""
        if name in vars(obj):
            raise RuntimeError(f"{type(obj).__name__}.{name} is already overridden on this instance")
        original = getattr(obj, name)
        wrapper = functools.wraps(original)(make_wrapper(original))
        setattr(obj, name, wrapper)
        self._wrapped.append((obj, name))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._wrapped:
            obj, name = self._wrapped.pop()
            if name in vars(obj):
                delattr(obj, name)
