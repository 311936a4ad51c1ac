"""Every compression method by name: the one list the command line, the benchmarks and the tests read.

`method("apet", budget=64)` is `ApET(budget=64)`; names are case-insensitive ("ApET" and "apet" are
the same method everywhere).
"""
from __future__ import annotations

from dataclasses import dataclass

from .methods import ALVTS, DART, ApET, DivPrune, FastV, PDrop, Random, VisionZip


@dataclass(frozen=True)
class MethodEntry:
    """One method.

    Attributes:
        name: its display name, the class name (e.g. "ApET").
        cls: the method's dataclass.
        reads_prompt: its selection reads the text tokens too (the last token's attention, text
            pivots, or the layer's queries), so a longer prompt may select differently.
    """

    name: str
    cls: type
    reads_prompt: bool

    @property
    def key(self) -> str:
        return self.name.lower()


METHODS: tuple[MethodEntry, ...] = (
    MethodEntry("ApET", ApET, reads_prompt=False),
    MethodEntry("ALVTS", ALVTS, reads_prompt=True),
    MethodEntry("Random", Random, reads_prompt=False),
    MethodEntry("DivPrune", DivPrune, reads_prompt=False),
    MethodEntry("FastV", FastV, reads_prompt=True),
    MethodEntry("PDrop", PDrop, reads_prompt=True),
    MethodEntry("DART", DART, reads_prompt=True),
    MethodEntry("VisionZip", VisionZip, reads_prompt=False),
)


def method_names() -> tuple[str, ...]:
    """Display names of every method, in the registry's order."""
    return tuple(entry.name for entry in METHODS)


def entry(name: str) -> MethodEntry:
    """The method called `name` (any case); ValueError naming the known ones otherwise."""
    for candidate in METHODS:
        if candidate.key == str(name).lower():
            return candidate
    raise ValueError(f"unknown method {name!r}; choose among {', '.join(method_names())}")


def method(name: str, **fields):
    """An instance of the method called `name` with these fields, e.g. method("apet", budget=64)."""
    return entry(name).cls(**fields)
