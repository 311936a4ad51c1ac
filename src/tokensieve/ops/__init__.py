"""Pure batched tensor functions (inputs (B, N, D), float32 maths whatever the input dtype)."""
from .apet import apet_plan, apet_reduce
from .approximation import approximation_error, gather_tokens
from .fps import default_start, farthest_point_sample
from .plan import ReductionPlan, selection_plan

__all__ = [
    "ReductionPlan",
    "apet_plan",
    "apet_reduce",
    "approximation_error",
    "default_start",
    "farthest_point_sample",
    "gather_tokens",
    "selection_plan",
]
