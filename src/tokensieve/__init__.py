"""tokensieve: visual token compression for Hugging Face vision-language models.

Importing this package changes nothing in transformers; hooks live on the model instance that
`compress` is given and are removed by the handle it returns.
"""
from . import ops, registry
from .api import CompressionHandle, compress
from .calibrate import calibrate_alvts
from .methods import ALVTS, ApET, DART, DivPrune, FastV, PDrop, Random, Replay, VisionZip
from .selectors import Selectors, SelectorMismatchError
from .models import supported_model_types

__version__ = "0.1.0"

__all__ = ["ALVTS", "ApET", "DART", "DivPrune", "FastV", "PDrop", "Random", "Replay", "VisionZip", "Selectors", "SelectorMismatchError", "calibrate_alvts", "CompressionHandle", "compress", "ops", "registry", "supported_model_types", "__version__"]
