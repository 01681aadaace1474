"""What the sync layer tells the world: a small observer interface passed into the Fleet.

The sync layer must not import the API; the app passes an object with ``publish(kind, data)`` (the
event bus, wsync.jobs.events.EventBus, fits) and the sync layer calls it on every change:

- ``engine.state``    an engine was created, changed state, version or transport, or was stopped
                      (data: the EngineInfo as JSON).
- ``trainer.version`` the trainer's weight version changed (load, reset, step, patch, restore)
                      (data: ``{"version": ..., "model": ..., "dtype": ...}``).

Publishing never fails the caller: an observer that raises is logged and ignored."""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger("wsync.sync")


class Observer(Protocol):
    def publish(self, kind: str, data: dict[str, Any] | None = None) -> Any: ...


class NullObserver:
    """The default: nobody is listening."""

    def publish(self, kind: str, data: dict[str, Any] | None = None) -> None:
        return None


def notify(observer: Observer, kind: str, data: dict[str, Any]) -> None:
    try:
        observer.publish(kind, data)
    except Exception:  # noqa: BLE001 - an observer must never break a sync
        log.exception("observer failed on %s", kind)
