"""Compression methods: one file each, a frozen dataclass of hyper-parameters plus its schedule."""
from .apet import ApET
from .base import Schedule

__all__ = ["ApET", "Schedule"]
