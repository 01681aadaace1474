"""The embedded default model (tiny Qwen2 + byte-level BPE), generated offline and deterministically.

Names are loaded lazily from :mod:`wsync.models.tiny` so ``python -m wsync.models.tiny`` runs cleanly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "DEFAULT_MODEL_DIRNAME",
    "DEFAULT_MODEL_NAME",
    "build_tiny_model",
    "ensure_default_model",
    "resolve_model",
]

if TYPE_CHECKING:  # pragma: no cover
    from .resolve import resolve_local as resolve_model
    from .tiny import (
        DEFAULT_MODEL_DIRNAME,
        DEFAULT_MODEL_NAME,
        build_tiny_model,
        ensure_default_model,
    )


def __getattr__(name: str) -> Any:
    if name == "resolve_model":  # the service's resolver without root confinement, for local tools
        from .resolve import resolve_local

        return resolve_local
    if name in __all__:
        from . import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
