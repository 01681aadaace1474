"""Trainer-side publishing core (torch only, no Ray, no HTTP): the built-in trainer actor and a user's
own training process put weights on the engines through this one send path. See docs/PUBLISHER.md."""

from .names import DROP, LayoutError, NameMap, check_layout, strip_wrappers
from .publisher import DENSE_FRACTION, MODES, Plan, PublishError, Publisher, PublishReport
from .source import WeightSource, is_dtensor, is_publishing_rank, world_rank

__all__ = [
    "DROP", "LayoutError", "NameMap", "check_layout", "strip_wrappers", "DENSE_FRACTION", "MODES", "Plan",
    "PublishError", "Publisher", "PublishReport", "WeightSource", "is_dtensor", "is_publishing_rank", "world_rank",
]
