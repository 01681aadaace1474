"""Calling actors from the sync layer: one timeout, and failures mapped to service errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from wsync.actors.ref import ActorGone, Actors, CallTimeout, RemoteError
from wsync.errors import ServiceError, Unavailable


def short(exc: BaseException) -> str:
    """The last non-empty line of an error's text (remote errors carry a whole traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


class Caller:
    """Gathers pending actor calls with the service's group timeout (Settings.group_timeout_s)."""

    def __init__(self, actors: Actors, timeout_s: float):
        self.actors, self.timeout_s = actors, timeout_s

    def wait(self, pending: Sequence[Any], timeout: float | None = None) -> list[Any]:
        """Results in order; raises the backend's CallTimeout / ActorGone / RemoteError as they are
        (a job records their text as its error)."""
        return self.actors.wait(list(pending), timeout or self.timeout_s)

    def get(self, pending: Any, what: str, timeout: float | None = None) -> Any:
        """One call for a synchronous request: a timeout or a dead actor is 503, a remote error 400."""
        try:
            return self.wait([pending], timeout)[0]
        except CallTimeout:
            raise Unavailable(f"{what} timed out") from None
        except ActorGone as exc:
            raise Unavailable(f"{what}: the actor is gone ({short(exc)})") from exc
        except RemoteError as exc:
            raise ServiceError(f"{what} failed: {short(exc)}") from exc

    def best_effort(self, pending: Sequence[Any], timeout: float = 60.0) -> None:
        """Wait for these calls, ignoring every failure (teardown, resume)."""
        try:
            self.wait(pending, timeout)
        except Exception:  # noqa: BLE001 - best effort by contract
            pass
