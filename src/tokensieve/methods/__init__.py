"""Compression methods: one file each, a frozen dataclass of hyper-parameters plus its schedule."""
from .alvts import ALVTS
from .apet import ApET
from .base import Schedule
from .replay import Replay

__all__ = ["ALVTS", "ApET", "Replay", "Schedule"]
