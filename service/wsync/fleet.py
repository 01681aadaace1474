"""The fleet: the trainer and engine Ray actors, and the state the service keeps about them."""

from __future__ import annotations

import logging
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray

from wsync.errors import Conflict, InvalidInput, NotFound, ServiceError, Unavailable
from wsync.jobs.runner import ResourceLocks
from wsync.jobs.store import Store
from wsync.schemas import EngineInfo, EngineKind, EngineLaunch, EngineState, PatchInfo, PatchPrepare, TrainerInfo
from wsync.schemas.common import utcnow
from wsync.settings import Settings

log = logging.getLogger("wsync.fleet")


@dataclass
class EngineRecord:
    info: EngineInfo
    handle: Any = None
    link: str | None = None  # the transfer group the engine is in now (kept open between syncs)


def trainer_lock() -> str:
    return "trainer"


def engine_lock(engine_id: str) -> str:
    return f"engine:{engine_id}"


class Fleet:
    """Owns the Ray actors. Methods here take no locks: the API and the job runner do."""

    def __init__(self, settings: Settings, store: Store, locks: ResourceLocks):
        self.settings, self.store, self.locks = settings, store, locks
        self.device = "cpu"
        self.trainer = None
        self.trainer_info: dict = {"loaded": False}
        self.engines: dict[str, EngineRecord] = {}
        self.links: dict[tuple[str, ...], str] = {}  # (kind, protocol, engine ids in rank order) -> group name
        self.snapshots: list[str] = []  # weight versions the trainer holds a copy of (for deltas)
        self._guard = threading.RLock()
        self._started_ray = False

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if self.settings.ray_address:
                kwargs["address"] = self.settings.ray_address
            elif self.settings.ray_num_cpus is not None:
                kwargs["num_cpus"] = self.settings.ray_num_cpus
            ray.init(**kwargs)
            self._started_ray = True
        if self.settings.device == "auto":
            self.device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        else:
            self.device = self.settings.device

    def stop(self) -> None:
        for rec in list(self.engines.values()):
            self._kill(rec.handle)
        self._kill(self.trainer)
        self.engines.clear()
        self.trainer = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def ready_checks(self) -> dict[str, str]:
        checks = {"ray": "ok" if ray.is_initialized() else "down"}
        try:
            self.store.ping()
            checks["database"] = "ok"
        except Exception as exc:  # pragma: no cover - depends on the backend
            checks["database"] = f"error: {exc}"
        return checks

    @contextmanager
    def holding(self, *names: str, timeout: float = 2.0):
        """Take resource locks for a synchronous request; busy resources answer 409 + Retry-After."""
        held = self.locks.try_acquire(names, timeout)
        if held is None:
            raise Conflict(f"{', '.join(names)} busy with a running job; retry shortly", retry_after=2)
        try:
            yield
        finally:
            for lock in reversed(held):
                lock.release()

    def timeout(self) -> float:
        return self.settings.group_timeout_s

    # ---- models -------------------------------------------------------------------------
    def resolve_model(self, name: str | None) -> str:
        from wsync.models.tiny import resolve_model

        if name is None:
            name = self.settings.default_model or self.trainer_info.get("model")
        return resolve_model(name, self.settings.cache_dir)

    # ---- trainer ------------------------------------------------------------------------
    def _trainer(self):
        if self.trainer is None:
            from wsync.actors.engine import create_trainer

            self.trainer = create_trainer(self.device, self.settings.delta_snapshots, self.settings.dense_bucket_bytes)
        return self.trainer

    def load_trainer(self, model: str | None, dtype: str = "bfloat16") -> TrainerInfo:
        resolved = self.resolve_model(model)
        info = self._call(self._trainer().load.remote(resolved, dtype), "trainer load")
        return self._set_trainer_info(info)

    def ensure_trainer(self, model: str | None = None) -> TrainerInfo:
        resolved = self.resolve_model(model)
        if not self.trainer_info.get("loaded") or self.trainer_info.get("model") != resolved:
            return self.load_trainer(resolved, self.trainer_info.get("dtype") or "bfloat16")
        return TrainerInfo(**self.trainer_info)

    def reset_trainer(self) -> TrainerInfo:
        self.require_trainer()
        return self._set_trainer_info(self._call(self.trainer.reset.remote(), "trainer reset"))

    def require_trainer(self) -> None:
        if not self.trainer_info.get("loaded"):
            raise Conflict("the trainer has no model loaded: POST /v1/trainer/load first", field="trainer")

    def refresh_trainer_version(self, version: str) -> None:
        self.trainer_info["version"] = version

    def trainer_specs(self) -> dict[str, dict]:
        return {p["name"]: p for p in self.trainer_info.get("params", [])}

    def _set_trainer_info(self, info: dict) -> TrainerInfo:
        if info.get("loaded") and "params" not in info:
            info = self._call(self.trainer.info.remote(True), "trainer info")
        self.trainer_info = info
        return TrainerInfo(**{k: v for k, v in info.items() if k != "params"})

    # ---- engines ------------------------------------------------------------------------
    def launch_engine(self, req: EngineLaunch) -> EngineInfo:
        from wsync.actors.engine import create_engine

        if req.kind == EngineKind.vllm and self.device != "cuda":
            raise InvalidInput("vLLM engines need a GPU; this cluster has none", field="kind")
        model = self.resolve_model(req.model)
        engine_id = f"e-{uuid.uuid4().hex[:8]}"
        info = EngineInfo(id=engine_id, kind=req.kind, model=model, name=req.name, state=EngineState.starting,
                          version=f"base:{model}", created_at=utcnow())
        options = {"gpu_memory_utilization": req.gpu_memory_utilization, "enforce_eager": req.enforce_eager,
                   "bucket_bytes": self.settings.dense_bucket_bytes, "sync_route": req.sync_route}
        rec = EngineRecord(info=info, handle=create_engine(req.kind.value, model, self.device, options))
        with self._guard:
            self.engines[engine_id] = rec
        if req.wait:
            self._await_ready(rec)
        else:
            threading.Thread(target=self._await_ready, args=(rec,), daemon=True).start()
        return rec.info

    def _await_ready(self, rec: EngineRecord) -> None:
        try:
            details = ray.get(rec.handle.ready.remote(), timeout=self.settings.engine_start_timeout_s)
            rec.info.details, rec.info.device = details, details.get("device")
            rec.info.state = EngineState.ready
        except Exception as exc:
            rec.info.state, rec.info.error = EngineState.failed, _short(exc)
            log.warning("engine %s failed to start: %s", rec.info.id, exc)

    def get_engine(self, engine_id: str) -> EngineRecord:
        rec = self.engines.get(engine_id)
        if rec is None:
            raise NotFound(f"no engine {engine_id!r}", field="engine_id")
        return rec

    def ready_engines(self, engine_ids: list[str], field: str = "engine_ids") -> list[EngineRecord]:
        if len(set(engine_ids)) != len(engine_ids):
            raise InvalidInput("engine_ids has duplicates", field=field)
        recs = []
        for i, eid in enumerate(engine_ids):
            rec = self.engines.get(eid)
            if rec is None:
                raise NotFound(f"no engine {eid!r}", field=f"{field}.{i}")
            if rec.info.state not in (EngineState.ready, EngineState.busy):
                raise Conflict(f"engine {eid} is {rec.info.state.value}, not ready", field=f"{field}.{i}")
            recs.append(rec)
        return recs

    def list_engines(self) -> list[EngineInfo]:
        return [r.info for r in self.engines.values()]

    def delete_engine(self, engine_id: str) -> EngineInfo:
        rec = self.get_engine(engine_id)
        self.drop_links(engine_id)  # while the engine is still listed: both sides close together
        with self._guard:
            self.engines.pop(engine_id, None)
        try:
            ray.get(rec.handle.shutdown.remote(), timeout=30)
        except Exception:
            pass
        self._kill(rec.handle)
        rec.info.state = EngineState.stopped
        return rec.info

    def generate(self, engine_id: str, prompts: list[str], max_new_tokens: int) -> list[dict]:
        rec = self.ready_engines([engine_id], field="engine_id")[0]
        return self._call(rec.handle.generate.remote(prompts, max_new_tokens), f"engine {engine_id} generate")

    # ---- transfer groups ----------------------------------------------------------------
    def drop_links(self, engine_id: str | None = None) -> None:
        """Forget and close the groups that include this engine, or all groups: the trainer and every
        engine still in the group close their side at the same time (an NCCL communicator's teardown
        may wait for its peers, so one side closing alone can stall until a timeout)."""
        for key, name in list(self.links.items()):
            if engine_id is None or engine_id in key[2:]:  # key: (kind, protocol, *engine ids)
                self.links.pop(key, None)
                refs = [self.trainer.close_group.remote(name)] if self.trainer is not None else []
                for eid in key[2:]:
                    rec = self.engines.get(eid)
                    if rec is not None and rec.link == name:
                        rec.link = None
                        refs.append(rec.handle.leave_group.remote())
                try:
                    ray.get(refs, timeout=60)
                except Exception:
                    pass

    # ---- training and deltas --------------------------------------------------------------
    def step(self, req) -> dict:
        self.require_trainer()
        out = self._call(self.trainer.step.remote(f"s-{uuid.uuid4().hex[:10]}", req.texts, req.optimizer, req.lr,
                                                  req.steps), "trainer step")
        self.refresh_trainer_version(out["version"])
        return out

    def prepare_delta_check(self, recs: list[EngineRecord]) -> str:
        """The engines' common version, which the trainer must hold a copy of (else 409)."""
        self.require_trainer()
        versions = {r.info.version for r in recs}
        if len(versions) != 1 or None in versions:
            raise Conflict(f"a delta sync needs engines at one known version; they serve {sorted(map(str, versions))}",
                           field="engine_ids", rule="baseline_match")
        base = versions.pop()
        if base not in self.snapshots:
            raise Conflict(f"the trainer keeps no copy of version {base!r} to diff against; sync dense first",
                           field="delta", rule="snapshot_exists")
        return base

    def prepare_delta(self, recs: list[EngineRecord]) -> PatchInfo:
        """A patch holding exactly what changed between the engines' version and the trainer's weights."""
        base = self.prepare_delta_check(recs)
        patch_id = f"p-{uuid.uuid4().hex[:10]}"
        out = self._call(self.trainer.prepare_delta.remote(patch_id, base), "delta")
        info = PatchInfo(id=patch_id, kind="delta", created_at=utcnow(), **out)
        self.store.add_patch(info)
        return info

    def synced(self, version: str, patch: PatchInfo | None) -> None:
        """Tell the trainer which versions engines serve now, so it keeps the right snapshots."""
        keep = sorted({r.info.version for r in self.engines.values() if r.info.version})
        self.snapshots = self._call(self.trainer.mark_synced.remote(
            version, patch.id if patch else None, patch.base_version if patch else None, keep), "snapshot")

    # ---- patches ------------------------------------------------------------------------
    def prepare_patch(self, req: PatchPrepare, tensors: list | None = None) -> PatchInfo:
        """Apply a patch to the trainer and record it. ``tensors``: validated inline SparsePatches."""
        self.require_trainer()
        patch_id = f"p-{uuid.uuid4().hex[:10]}"
        spec = req.model_dump(exclude={"kind", "patches"})
        if tensors is not None:
            spec["patches"] = tensors
        if req.kind.value == "reference" and req.param not in self.trainer_specs():
            raise InvalidInput(f"no parameter {req.param!r} in the trainer's model", field="param", rule="name_exists")
        if req.params:
            for i, name in enumerate(req.params):
                if name not in self.trainer_specs():
                    raise InvalidInput(f"no parameter {name!r} in the trainer's model", field=f"params.{i}", rule="name_exists")
        out = self._call(self.trainer.prepare_patch.remote(patch_id, req.kind.value, spec), "prepare patch")
        info = PatchInfo(id=patch_id, kind=req.kind, created_at=utcnow(), **out)
        self.store.add_patch(info)
        self.refresh_trainer_version(patch_id)
        return info

    # ---- helpers ------------------------------------------------------------------------
    def _call(self, ref, what: str, timeout: float | None = None):
        try:
            return ray.get(ref, timeout=timeout or self.timeout())
        except ray.exceptions.GetTimeoutError:
            raise Unavailable(f"{what} timed out") from None
        except ray.exceptions.RayActorError as exc:
            raise Unavailable(f"{what}: the actor is gone ({_short(exc)})") from exc
        except ray.exceptions.RayTaskError as exc:
            raise ServiceError(f"{what} failed: {_short(exc)}") from exc

    @staticmethod
    def _kill(handle) -> None:
        if handle is not None:
            try:
                ray.kill(handle)
            except Exception:
                pass


def _short(exc: BaseException) -> str:
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
