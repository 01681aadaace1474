"""The registry: the trainer and the engines the service runs, as typed records, and the transfer
groups between them. Methods take no locks (the API and the job runner do; ``holding`` is the API's).

Actors are reached through an ``Actors`` backend (wsync.actors.ref): Ray in the service, in-process
cores in fast tests."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from wsync.actors.ref import Actors
from wsync.engines.contract import EngineDetails
from wsync.errors import Conflict, InvalidInput, NotFound
from wsync.jobs.locks import ResourceLocks
from wsync.jobs.store import Store
from wsync.schemas import EngineInfo, EngineKind, EngineLaunch, EngineState
from wsync.schemas.common import utcnow
from wsync.settings import Settings

from .calls import Caller, short
from .groups import TransferGroups
from .records import EngineRecord
from .trainer import Trainer
from .transports import TrainerSide, choose

log = logging.getLogger("wsync.sync")


class Fleet:
    """What the service runs: ``trainer`` (wsync.sync.trainer.Trainer), ``engines`` (id ->
    EngineRecord) and ``groups`` (TransferGroups)."""

    def __init__(self, settings: Settings, store: Store, locks: ResourceLocks, actors: Actors):
        self.settings, self.store, self.locks, self.actors = settings, store, locks, actors
        self.caller = Caller(actors, settings.call_timeout_s)
        self.trainer = Trainer(settings, store, actors, self.caller)
        self.engines: dict[str, EngineRecord] = {}
        self.groups = TransferGroups(self.caller, settings.group_timeout_s, lambda: self.trainer.actor, self.engines,
                                     host=settings.rendezvous_host, probe_s=settings.probe_timeout_s)
        self._guard = threading.RLock()

    @property
    def device(self) -> str:
        return self.actors.device

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.actors.start()

    def stop(self) -> None:
        for rec in list(self.engines.values()):
            rec.actor.kill()
        self.trainer.kill()
        self.engines.clear()
        self.actors.stop()

    def ready_checks(self) -> dict[str, str]:
        checks = {"ray": "ok" if self.actors.alive() else "down"}
        try:
            self.store.ping()
            checks["database"] = "ok"
        except Exception as exc:  # pragma: no cover - depends on the backend
            checks["database"] = f"error: {exc}"
        self.refresh_liveness()
        failed = [f"{r.id} ({r.info.error})" for r in self.engines.values() if r.info.state == EngineState.failed]
        checks["engines"] = "ok" if not failed else "failed: " + "; ".join(failed)
        return checks

    def refresh_liveness(self) -> None:
        """Engines whose actor died (kill -9, crash) become ``failed`` with the cause; asks the actor
        backend (Ray's control store), never the actor, so a hung engine cannot stall it."""
        for rec in list(self.engines.values()):
            if rec.info.state in (EngineState.ready, EngineState.busy, EngineState.starting):
                cause = rec.actor.gone()
                if cause:
                    rec.info.state, rec.info.error = EngineState.failed, cause
                    log.warning("engine %s is dead: %s", rec.id, cause)

    @contextmanager
    def holding(self, *names: str, timeout: float = 2.0) -> Iterator[None]:
        """Resource locks for a synchronous request; busy resources answer 409 + Retry-After."""
        with self.locks.holding(*names, timeout=timeout):
            yield

    # ---- engines ------------------------------------------------------------------------
    def launch_engine(self, req: EngineLaunch) -> EngineInfo:
        if req.kind == EngineKind.vllm and self.device != "cuda":
            raise InvalidInput("vLLM engines need a GPU; this cluster has none", field="kind")
        model = self.trainer.resolve_model(req.model)
        engine_id = f"e-{uuid.uuid4().hex[:8]}"
        info = EngineInfo(id=engine_id, kind=req.kind, model=model, name=req.name, state=EngineState.starting,
                          version=f"base:{model}", created_at=utcnow())
        options = {"gpu_memory_utilization": req.gpu_memory_utilization, "enforce_eager": req.enforce_eager,
                   "bucket_bytes": self.settings.dense_bucket_bytes, "sync_route": req.sync_route}
        rec = EngineRecord(info=info, actor=self.actors.create_engine(req.kind.value, model, self.device, options))
        with self._guard:
            self.engines[engine_id] = rec
        if req.wait:
            self._await_ready(rec)
        else:
            threading.Thread(target=self._await_ready, args=(rec,), daemon=True).start()
        return rec.info

    def _await_ready(self, rec: EngineRecord) -> None:
        """Wait for the engine's ready(); choose its transport once, here."""
        try:
            details: EngineDetails = self.caller.wait([rec.actor.call("ready")],
                                                      self.settings.engine_start_timeout_s)[0]
            rec.transport = choose(details, TrainerSide(device=self.device))
            rec.info.details = _details_dict(details, rec.transport.name)
            rec.info.device = details.device
            rec.info.state = EngineState.ready
        except Exception as exc:
            rec.info.state, rec.info.error = EngineState.failed, short(exc)
            log.warning("engine %s failed to start: %s", rec.info.id, exc)

    def get_engine(self, engine_id: str) -> EngineRecord:
        self.refresh_liveness()
        rec = self.engines.get(engine_id)
        if rec is None:
            raise NotFound(f"no engine {engine_id!r}", field="engine_id")
        return rec

    def ready_engines(self, engine_ids: list[str], field: str = "engine_ids") -> list[EngineRecord]:
        """The records of these engines, each ready (or busy in a sync); 404/409 naming the field."""
        if len(set(engine_ids)) != len(engine_ids):
            raise InvalidInput("engine_ids has duplicates", field=field)
        recs = []
        self.refresh_liveness()
        for i, eid in enumerate(engine_ids):
            rec = self.engines.get(eid)
            if rec is None:
                raise NotFound(f"no engine {eid!r}", field=f"{field}.{i}")
            if rec.info.state not in (EngineState.ready, EngineState.busy):
                raise Conflict(f"engine {eid} is {rec.info.state.value}, not ready"
                               + (f" ({rec.info.error})" if rec.info.error else ""), field=f"{field}.{i}")
            recs.append(rec)
        return recs

    def list_engines(self) -> list[EngineInfo]:
        self.refresh_liveness()
        return [r.info for r in self.engines.values()]

    def delete_engine(self, engine_id: str) -> EngineInfo:
        rec = self.get_engine(engine_id)
        self.groups.drop_engine(engine_id)  # while the engine is still listed: every side closes together
        with self._guard:
            self.engines.pop(engine_id, None)
        if not rec.actor.gone():
            self.caller.best_effort([rec.actor.call("shutdown")], self.settings.probe_timeout_s)
        rec.actor.kill()
        rec.info.state = EngineState.stopped
        return rec.info

    def generate(self, engine_id: str, prompts: list[str], max_new_tokens: int) -> list[dict]:
        rec = self.ready_engines([engine_id], field="engine_id")[0]
        return self.caller.get(rec.actor.call("generate", prompts, max_new_tokens), f"engine {engine_id} generate")

    def serving_versions(self) -> list[str]:
        """Every known weight version some engine serves (what the trainer keeps snapshots of)."""
        return sorted({r.info.version for r in self.engines.values() if r.info.version})


def _details_dict(details: EngineDetails, transport: str) -> dict[str, Any]:
    """EngineInfo.details: the engine's facts, its extra (e.g. vLLM's generation and route), and the
    transport the service chose for it."""
    out: dict[str, Any] = {"kind": details.kind, "model": details.model, "device": details.device,
                           "num_tensors": details.num_tensors, "transports": list(details.transports),
                           "transport": transport}
    if details.gpu_uuid:
        out["gpu_uuid"] = details.gpu_uuid
    return {**details.extra, **out}
