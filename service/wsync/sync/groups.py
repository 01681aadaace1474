"""Transfer groups: the one place that opens, reuses, switches and tears down the process groups the
trainer shares with engines.

A group is keyed by (partition, transport, engine ids in rank order). A sync to exactly the same
engines over the same transport reuses the open group (no rendezvous, no communicator set-up); a sync
to a different set first closes every group its engines are in (an engine is in one group at a time)
and opens a new one. Teardown always happens on every side at once: the trainer closes its side and
every member engine still registered leaves, concurrently (an NCCL communicator's teardown may wait
for its peers, so one side closing alone can stall until a timeout). After a failed transfer the
group's state is unknown: the sync run closes it.

Every open passes the service's group timeout (Settings.group_timeout_s) to the trainer and to each
engine's join_group, and waits for them no longer than that: a peer that is dead, raises or never joins
ends the open with a ``Fault`` naming it (phase "open group"), and the group is closed on every side
with ``abort``. Teardown calls run on the actors' control lane (actors/ref.py CONTROL_METHODS), so they
reach a side whose open is still stuck; that open then closes what it opened and fails."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from wsync.actors.ref import ActorRef

from .calls import Caller
from .outcomes import TRAINER, Fault, blame, gather
from .records import EngineRecord
from .transports import Transport

#: how long a teardown may wait for every side before it gives up (best effort)
TEARDOWN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class OpenGroup:
    name: str
    transport: str
    engine_ids: tuple[str, ...]


class TransferGroups:
    """Owns every open group. ``trainer()`` gives the trainer's actor (None before one exists);
    ``engines`` is the registry's live engine map (teardown reaches only engines still registered)."""

    def __init__(self, caller: Caller, timeout_s: float, trainer: Callable[[], ActorRef | None],
                 engines: Mapping[str, EngineRecord], host: str | None = None, probe_s: float = 3.0):
        self.caller, self.timeout_s = caller, timeout_s
        self.host, self.probe_s = host, probe_s
        self._trainer, self._engines = trainer, engines
        self._open: dict[tuple[str, ...], OpenGroup] = {}
        self._guard = threading.RLock()

    def names(self) -> list[str]:
        return [g.name for g in self._open.values()]

    def ensure(self, transport: Transport, recs: list[EngineRecord], name: str, partition: str = "",
               on_open: Callable[[], None] | None = None) -> str:
        """The open group for exactly ``recs`` (rank i+1 = recs[i]) over ``transport``: reused when open
        and every engine is still in it, else opened as ``name`` (after closing the engines' old
        groups). ``on_open`` runs just before a new group is opened (for a job event)."""
        key = (partition, transport.name, *(r.id for r in recs))
        with self._guard:
            found = self._open.get(key)
            if found is not None and all(r.group == found.name for r in recs):
                return found.name
            if found is not None:
                self.close(found)
            for rec in recs:
                self.drop_engine(rec.id)
            group = OpenGroup(name, transport.name, tuple(r.id for r in recs))
            self._open[key] = group
            for rec in recs:
                rec.group = name  # joining: a failed open tears these sides down too
        if on_open is not None:
            on_open()
        try:
            self._open_all(transport, recs, name)
        except BaseException:
            self.close(group)
            raise
        return name

    def _open_all(self, transport: Transport, recs: list[EngineRecord], name: str) -> None:
        trainer = self._trainer()
        assert trainer is not None, "a group needs the trainer"
        uuids = [(r.info.details or {}).get("gpu_uuid") for r in recs]
        rdv = transport.rendezvous(self.caller, trainer, name, uuids, self.host)
        calls = [(TRAINER, transport.open(trainer, rdv, self.timeout_s))]
        calls += [(r.id, r.actor.call("join_group", rdv, i + 1, transport.name, self.timeout_s))
                  for i, r in enumerate(recs)]
        got = gather(self.caller, calls, self.timeout_s + 2.0)  # the sides' own timeouts fire first
        if got.broken:
            actors = {TRAINER: trainer, **{r.id: r.actor for r in recs}}
            raise Fault("open group", blame(self.caller, got, actors, self.timeout_s, self.probe_s))

    def close_named(self, name: str) -> None:
        """Tear down the group called ``name`` (if open) on every side."""
        with self._guard:
            found = [g for g in self._open.values() if g.name == name]
        for group in found:
            self.close(group)

    def close(self, group: OpenGroup) -> None:
        """Forget the group and tear it down on every side at once (best effort)."""
        with self._guard:
            self._open = {k: g for k, g in self._open.items() if g is not group}
            members = [self._engines[e] for e in group.engine_ids if e in self._engines]
            members = [r for r in members if r.group == group.name]
            for rec in members:
                rec.group = None
        trainer = self._trainer()
        pending = [trainer.call("close_group", group.name, True)] if trainer is not None else []
        pending += [r.actor.call("leave_group") for r in members if not r.actor.gone()]
        self.caller.best_effort(pending, TEARDOWN_TIMEOUT_S)

    def drop_engine(self, engine_id: str) -> None:
        """Close every group this engine is in (before it leaves the registry, or joins another)."""
        with self._guard:
            groups = [g for g in self._open.values() if engine_id in g.engine_ids]
        for group in groups:
            self.close(group)

    def close_all(self) -> None:
        with self._guard:
            groups = list(self._open.values())
        for group in groups:
            self.close(group)
