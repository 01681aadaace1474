"""Trainer-side publishing core (torch only, no Ray, no HTTP): the built-in trainer actor and a user's
own training process put weights on the engines through this one send path. See docs/PUBLISHER.md."""

from .names import DROP, LayoutError, NameMap, check_layout, strip_wrappers
from .publisher import (
    DENSE_FRACTION,
    MODES,
    Plan,
    Publisher,
    PublishError,
    PublishReport,
)
from .source import WeightSource, is_dtensor, is_publishing_rank, world_rank

__all__ = [
    "DENSE_FRACTION",
    "DROP",
    "MODES",
    "LayoutError",
    "NameMap",
    "Plan",
    "PublishError",
    "PublishReport",
    "Publisher",
    "WeightSource",
    "check_layout",
    "is_dtensor",
    "is_publishing_rank",
    "strip_wrappers",
    "world_rank",
]
