"""Pure batched tensor functions (inputs (B, N, D), float32 maths whatever the input dtype)."""
from .apet import apet_plan, apet_reduce
from .approximation import approximation_error, gather_tokens
from .divprune import divprune_select
from .fps import default_start, farthest_point_sample
from .plan import ReductionPlan, selection_plan
from .topk import top_scores

__all__ = [
    "ReductionPlan",
    "apet_plan",
    "apet_reduce",
    "approximation_error",
    "default_start",
    "divprune_select",
    "farthest_point_sample",
    "gather_tokens",
    "selection_plan",
    "top_scores",
]
