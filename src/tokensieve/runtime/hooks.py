"""Hooks and method wrappers that live on one model instance and are all removed together.

Copies are safe: `copy.deepcopy(model)` copies a module's hook dictionaries and instance attributes,
so a copy made while hooks are on would carry them. Every hook and wrapper placed here acts only on
the object it was placed on; on a copy it does nothing (a wrapper calls the class's own method), so
the copy computes what the uncompressed model computes, during the block and after it.
"""
from __future__ import annotations

import functools
import types
from typing import Any, Callable

import torch


def _only_on(target: torch.nn.Module, fn: Callable) -> Callable:
    """fn for calls on `target` itself; a no-op (None: leave the call as it is) on any copy of it."""

    def guarded(module, *args):
        return fn(module, *args) if module is target else None

    return guarded


def _copied_dispatch(obj: Any, name: str) -> bool:
    """Whether obj.name is a wrapper placed on another object that obj was copied from."""
    bound = vars(obj).get(name)
    owner = getattr(getattr(bound, "__func__", None), "wrapped_for", None)
    return owner is not None and owner is not obj


class HookSet:
    """Registers forward hooks and instance-level method wrappers; `remove()` undoes all of them."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._wrapped: list[tuple[Any, str]] = []

    @property
    def installed(self) -> bool:
        """Whether any hook or wrapper is on."""
        return bool(self._handles or self._wrapped)

    def pre(self, module: torch.nn.Module, fn: Callable) -> None:
        """fn(module, args, kwargs) -> None or (args, kwargs)."""
        self._handles.append(module.register_forward_pre_hook(_only_on(module, fn), with_kwargs=True))

    def post(self, module: torch.nn.Module, fn: Callable) -> None:
        """fn(module, args, kwargs, output) -> None or a replacement output."""
        self._handles.append(module.register_forward_hook(_only_on(module, fn), with_kwargs=True))

    def wrap_method(self, obj: Any, name: str, make_wrapper: Callable[[Callable], Callable]) -> None:
        """Shadow obj.name with make_wrapper(original) on this instance only (signature preserved).

        The shadow is bound to `obj`: a deep copy rebinds it to the copy, where it calls the class's
        own method instead of the wrapper.
        """
        if _copied_dispatch(obj, name):
            delattr(obj, name)  # left by a copy of an object we wrapped: inert, replaced by this one
        if name in vars(obj):
            raise ValueError(
                f"{type(obj).__name__}.{name} is already overridden on this instance by other code; tokensieve wraps "
                "it: remove that override first"
            )
        original = getattr(obj, name)
        wrapper = make_wrapper(original)

        @functools.wraps(getattr(type(obj), name))  # the unbound method: binding drops `self` from the signature
        def dispatch(owner, *args, **kwargs):
            if owner is obj:
                return wrapper(*args, **kwargs)
            return getattr(type(owner), name)(owner, *args, **kwargs)

        dispatch.wrapped_for = obj
        setattr(obj, name, types.MethodType(dispatch, obj))
        self._wrapped.append((obj, name))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._wrapped:
            obj, name = self._wrapped.pop()
            if name in vars(obj):
                delattr(obj, name)
