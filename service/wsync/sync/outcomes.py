"""Bounded waits with per-peer outcomes: the sync run's watchdog.

``gather`` waits for one phase's calls (one per peer: the trainer and each engine) under one deadline and
returns what each peer answered or why it did not. ``blame`` decides which peers broke the phase: a dead
actor (``ActorRef.gone``), one that raised, or one that does not answer a probe on its control lane (hung,
SIGSTOPped); peers that only waited on a broken one are not blamed. ``Fault`` is the error a job ends
with: it names the phase and every blamed peer with its cause.

``Deadline`` bounds a whole job (Settings.sync_timeout_s): every phase waits at most what is left of it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wsync.actors.ref import ActorGone, ActorRef, CallTimeout, RemoteError

from .calls import Caller, short

TRAINER = "trainer"


class Fault(RuntimeError):
    """A phase of a sync broke: ``phase`` and ``causes`` (peer -> cause) of the peers blamed."""

    def __init__(self, phase: str, causes: dict[str, str]):
        self.phase, self.causes = phase, dict(causes)
        who = "; ".join(f"{_peer(p)}: {c}" for p, c in causes.items()) or "no peer answered"
        super().__init__(f"{phase} failed: {who}")

    @property
    def engines(self) -> list[str]:
        return [p for p in self.causes if p != TRAINER]


def _peer(name: str) -> str:
    return name if name == TRAINER else f"engine {name}"


class Deadline:
    """The job's total budget; ``left(cap)`` is what a phase may wait (never more than ``cap``)."""

    def __init__(self, total_s: float):
        self.total_s, self.end = total_s, time.monotonic() + total_s

    def left(self, cap: float) -> float:
        return max(0.0, min(cap, self.end - time.monotonic()))

    def check(self, phase: str) -> None:
        if time.monotonic() >= self.end:
            raise Fault(phase, {TRAINER: f"the sync ran past sync_timeout_s={self.total_s:g}s"})


@dataclass
class Gathered:
    """One phase's answers: ``ok`` peer -> result, ``failed`` peer -> cause, ``timed_out`` peers."""

    ok: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    timed_out: list[str] = field(default_factory=list)

    @property
    def broken(self) -> bool:
        return bool(self.failed or self.timed_out)


def gather(caller: Caller, calls: Sequence[tuple[str, Any]], timeout_s: float,
           on_break: Callable[[], None] | None = None) -> Gathered:
    """Wait for every (peer, pending call) under one deadline of ``timeout_s``; never raises.
    ``on_break`` runs once, at the first failure or timeout (the watchdog: it aborts the group on every
    side, so peers still blocked on the broken one return at once instead of at their own timeout)."""
    out = Gathered()
    end = time.monotonic() + timeout_s
    for peer, pending in calls:
        if out.broken and on_break is not None:
            on_break()
            on_break = None
        try:
            out.ok[peer] = caller.wait([pending], max(0.01, end - time.monotonic()))[0]
        except CallTimeout:
            out.timed_out.append(peer)
        except ActorGone as exc:
            out.failed[peer] = f"the actor is dead ({short(exc)})"
        except RemoteError as exc:
            out.failed[peer] = short(exc)
        except Exception as exc:  # noqa: BLE001 - anything else is this peer's failure too
            out.failed[peer] = short(exc)
    return out


def blame(caller: Caller, got: Gathered, actors: dict[str, ActorRef], timeout_s: float,
          probe_s: float) -> dict[str, str]:
    """The peers that broke a phase, with causes. Dead actors first (whatever they answered), then
    those that raised, then timed-out peers that do not answer a probe; if every timed-out peer
    answers, all of them are blamed for the timeout."""
    causes: dict[str, str] = {}
    for peer, ref in actors.items():
        dead = ref.gone()
        if dead:
            causes[peer] = dead
    wire_only = {p: c for p, c in got.failed.items() if p not in causes}
    # a peer whose error only says the group broke waited on someone else; blame it only if nobody else is
    for peer, cause in wire_only.items():
        if not _is_peer_error(cause):
            causes[peer] = cause
    hung = [p for p in got.timed_out if p not in causes]
    if hung:
        probes = [(p, actors[p].probe("info" if p == TRAINER else "ready")) for p in hung if p in actors]
        answered = gather(caller, probes, probe_s).ok
        silent = [p for p in hung if p not in answered]
        for peer in silent or ([] if causes else hung):
            causes[peer] = (f"not answering (hung or stopped) after {timeout_s:g}s" if peer in silent
                            else f"timed out after {timeout_s:g}s")
    if not causes:
        causes.update(wire_only)
    return causes


def _is_peer_error(cause: str) -> bool:
    """Errors a rank raises when *another* rank went away (connection reset, gloo/NCCL timeouts, abort)."""
    text = cause.lower()
    return any(k in text for k in ("connection reset", "connection closed", "timed out", "timeout",
                                   "abandoned", "aborted", "broken pipe", "peer", "not every rank", "not open",
                                   "closed"))
