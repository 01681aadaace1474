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

from wsync.actors.placement import PlacementError, memory_budget
from wsync.actors.ref import Actors
from wsync.engines.contract import EngineDetails
from wsync.errors import Conflict, InvalidInput, NotFound
from wsync.jobs.locks import ResourceLocks
from wsync.jobs.store import Store
from wsync.schemas import EngineInfo, EngineKind, EngineLaunch, EngineState
from wsync.schemas.common import utcnow
from wsync.settings import Settings

from .calls import Caller, short
from .external import Publishers
from .groups import TransferGroups
from .observer import NullObserver, Observer, notify
from .records import EngineRecord
from .trainer import Trainer
from .transports import TrainerSide, choose

log = logging.getLogger("wsync.sync")


class Fleet:
    """What the service runs: ``trainer`` (wsync.sync.trainer.Trainer), ``engines`` (id ->
    EngineRecord) and ``groups`` (TransferGroups). Every engine change goes through ``set_engine``,
    which tells the ``observer`` (wsync.sync.observer: ``engine.state`` / ``trainer.version``)."""

    def __init__(self, settings: Settings, store: Store, locks: ResourceLocks, actors: Actors,
                 observer: Observer | None = None):
        self.settings, self.store, self.locks, self.actors = settings, store, locks, actors
        self.observer: Observer = observer or NullObserver()
        self.caller = Caller(actors, settings.call_timeout_s)
        self.trainer = Trainer(settings, store, actors, self.caller, self.observer)
        self.engines: dict[str, EngineRecord] = {}
        self.groups = TransferGroups(self.caller, settings.group_timeout_s, lambda: self.trainer.actor, self.engines,
                                     host=settings.rendezvous_host, probe_s=settings.probe_timeout_s)
        self.publishers = Publishers(settings.publisher_lease_s, self._engine_metas)
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
        """Create the engine and wait until it is ready (or failed); the comparison's way."""
        rec = self.create_engine(req)
        self.await_ready(rec)
        return rec.info

    def create_engine(self, req: EngineLaunch) -> EngineRecord:
        """Check the request, start the engine's actor and list it (state ``starting``) before anything
        slow happens, so an engine nobody waits for still shows up with its state. The engine loads the
        trainer's dtype unless the request names one; a different one is refused here (409, ``dtype``)
        rather than at the first sync."""
        if req.kind == EngineKind.vllm and self.device != "cuda":
            raise InvalidInput("vLLM engines need a GPU; this cluster has none", field="kind")
        dtype = self.engine_dtype(req.dtype)
        model = self.trainer.resolve_model(req.model)
        engine_id = f"e-{uuid.uuid4().hex[:8]}"
        info = EngineInfo(id=engine_id, kind=req.kind, model=model, name=req.name, state=EngineState.starting,
                          version=f"base:{model}", created_at=utcnow(), dtype=dtype)
        options = {"gpu_memory_utilization": req.gpu_memory_utilization, "enforce_eager": req.enforce_eager,
                   "bucket_bytes": self.settings.dense_bucket_bytes, "sync_route": req.sync_route, "dtype": dtype}
        if req.kind == EngineKind.vllm and getattr(self.actors, "colocated", False):
            self._check_gpu_memory(req.gpu_memory_utilization)
        try:
            actor = self.actors.create_engine(req.kind.value, model, self.device, options)
        except PlacementError as exc:
            raise Conflict(f"cannot place the engine: {exc}", field="kind", rule="gpu_capacity") from exc
        rec = EngineRecord(info=info, actor=actor)
        with self._guard:
            self.engines[engine_id] = rec
        self.set_engine(rec)
        return rec

    def _check_gpu_memory(self, utilization: float) -> None:
        """A colocated vLLM engine must fit next to the trainer (actors/placement.memory_budget): 409
        naming gpu_memory_utilization, what it needs and what the GPU has, instead of a failed start."""
        mem = self.trainer.gpu_memory()
        if not mem:
            return
        why = memory_budget(utilization, int(mem["free"]), int(mem["total"]), int(mem.get("param_bytes", 0)),
                            int(mem.get("allocated", 0)), self.settings.delta_snapshots)
        if why:
            raise Conflict(f"the engine does not fit on the GPU it shares with the trainer: {why}",
                           field="gpu_memory_utilization", rule="gpu_memory")

    def engine_dtype(self, wanted: str | None) -> str:
        """The dtype a new engine loads: the trainer's (when loaded), else ``wanted`` or bfloat16."""
        trainer = self.trainer.info.dtype if self.trainer.info.loaded else None
        if wanted is not None and trainer is not None and wanted != trainer:
            raise Conflict(f"dtype {wanted} differs from the trainer's {trainer}: an engine must hold the "
                           "trainer's dtype to receive its weights; leave dtype out to inherit it",
                           field="dtype", rule="dtype_match")
        return wanted or trainer or "bfloat16"

    def await_ready(self, rec: EngineRecord, timeout: float | None = None) -> None:
        """Wait for the engine's ready(); choose its transport once, here. Never raises: a failure is
        recorded on the engine (state ``failed`` + error)."""
        try:
            details: EngineDetails = self.caller.wait([rec.actor.call("ready")],
                                                      timeout or self.settings.engine_start_timeout_s)[0]
            rec.transport = choose(details, TrainerSide(device=self.device, gpu_uuid=self.trainer.gpu_uuid()))
            self.set_engine(rec, details={**_details_dict(details, rec.transport.name),
                                          "colocated": bool(getattr(self.actors, "colocated", False))},
                            device=details.device, state=EngineState.ready)
        except Exception as exc:
            self.set_engine(rec, state=EngineState.failed, error=short(exc))
            log.warning("engine %s failed to start: %s", rec.info.id, exc)

    def set_engine(self, rec: EngineRecord, **fields: Any) -> None:
        """Change an engine's info and tell the observer (``engine.state``)."""
        for key, value in fields.items():
            setattr(rec.info, key, value)
        notify(self.observer, "engine.state", rec.info.model_dump(mode="json"))

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
        """Engines in launch order."""
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
        wait_gone = getattr(rec.actor, "wait_gone", None)
        if wait_gone is not None and getattr(self.actors, "colocated", False):
            wait_gone(30.0)  # its GPU memory is free before a colocated engine starts next to the trainer
        self.set_engine(rec, state=EngineState.stopped)
        return rec.info

    def generate(self, engine_id: str, prompts: list[str], max_new_tokens: int) -> list[dict]:
        rec = self.ready_engines([engine_id], field="engine_id")[0]
        return self.caller.get(rec.actor.call("generate", prompts, max_new_tokens), f"engine {engine_id} generate")

    def _engine_metas(self, rec: EngineRecord) -> list:
        """An engine's checkpoint layout (TensorMetas), for an external trainer's layout check."""
        return self.caller.get(rec.actor.call("param_metas"), f"engine {rec.id} param_metas")

    def sample(self, engine_id: str, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
               top_k: int, seed: int) -> tuple[str | None, list[dict]]:
        """Sampled completions with logprobs (rollouts) and the version that produced them."""
        rec = self.ready_engines([engine_id], field="engine_id")[0]
        version = rec.info.version
        try:
            pending = rec.actor.call("sample", prompts, n, max_new_tokens, temperature, top_k, seed)
        except AttributeError:  # the optional contract method (engines.contract.SamplingEngine) is absent
            raise Conflict(f"engine {engine_id} ({rec.info.kind.value}) does not sample", field="engine_id") from None
        return version, self.caller.get(pending, f"engine {engine_id} sample")

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
