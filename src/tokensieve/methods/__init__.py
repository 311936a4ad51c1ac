"""Compression methods: one file each, a frozen dataclass of hyper-parameters plus its schedule."""
from .alvts import ALVTS
from .apet import ApET
from ..runtime.schedule import Schedule
from .dart import DART
from .divprune import DivPrune
from .fastv import FastV
from .pdrop import PDrop
from .random import Random
from .replay import Replay
from .visionzip import VisionZip

__all__ = ["ALVTS", "ApET", "DART", "DivPrune", "FastV", "PDrop", "Random", "Replay", "Schedule", "VisionZip"]
