"""The trainer's side of the registry: its actor, its typed state, and the calls that change it.

Methods take no locks (the API and the job runner do). Every call that changes the trainer's weights
updates ``record.info.version`` here, so the registry never goes back to the actor to learn it."""

from __future__ import annotations

import threading
import uuid

from wsync.actors.placement import PlacementError
from wsync.actors.ref import ActorRef, Actors
from wsync.actors.trainer import MAX_HELD_PATCHES
from wsync.errors import Conflict, InvalidInput
from wsync.jobs.store import Store
from wsync.schemas import PatchInfo, PatchPrepare, TrainerInfo, TrainerStep, TrainerStepResult
from wsync.schemas.common import utcnow
from wsync.settings import Settings

from .calls import Caller
from .observer import NullObserver, Observer, notify
from .records import TrainerRecord


class Trainer:
    def __init__(self, settings: Settings, store: Store, actors: Actors, caller: Caller,
                 observer: Observer | None = None):
        self.settings, self.store, self.actors, self.caller = settings, store, actors, caller
        self.observer: Observer = observer or NullObserver()
        self.actor: ActorRef | None = None
        self.record = TrainerRecord()
        self._gpu_uuid: tuple[ActorRef | None, str | None] | None = None
        self._create_lock = threading.Lock()

    @property
    def info(self) -> TrainerInfo:
        return self.record.info

    @property
    def version(self) -> str | None:
        return self.record.info.version

    # ---- lifecycle ----------------------------------------------------------------------
    def resolve_model(self, name: str | None) -> str:
        """A local folder inside WSYNC_MODEL_ROOTS (or the embedded default, or a hub id where allowed);
        anything else is a 422 naming ``model`` (models/resolve.py)."""
        from wsync.models.resolve import resolve_model

        if name is None:
            name = self.settings.default_model or self.record.info.model
        s = self.settings
        return resolve_model(name, s.resolved_model_roots(), s.cache_dir, s.allow_hub_models)

    def _actor(self) -> ActorRef:
        with self._create_lock:  # an engine becoming ready may ask for the trainer's GPU concurrently
            if self.actor is not None and self.actor.gone():
                self.actor = None  # a dead trainer (killed, crashed) is replaced by the next load
            if self.actor is None:
                try:
                    self.actor = self.actors.create_trainer(self.actors.device, self.settings.delta_snapshots,
                                                            self.settings.dense_bucket_bytes)
                except PlacementError as exc:
                    raise Conflict(f"cannot place the trainer: {exc}", field="trainer", rule="gpu_capacity") from exc
            return self.actor

    def load(self, model: str | None, dtype: str = "bfloat16") -> TrainerInfo:
        resolved = self.resolve_model(model)
        return self._loaded(self.caller.get(self._actor().call("load", resolved, dtype), "trainer load",
                                            self.settings.engine_start_timeout_s))

    def ensure(self, model: str | None = None) -> TrainerInfo:
        """The trainer with ``model`` loaded (loading it only when another or none is)."""
        resolved = self.resolve_model(model)
        if not self.record.info.loaded or self.record.info.model != resolved:
            return self.load(resolved, self.record.info.dtype or "bfloat16")
        return self.record.info

    def reset(self) -> TrainerInfo:
        self.require()
        return self._loaded(self.caller.get(self._actor().call("reset"), "trainer reset",
                                            self.settings.engine_start_timeout_s))

    def stash(self) -> TrainerRecord:
        """Set the trainer's state aside (in the actor) and continue on a fresh load; returns the
        record to give back to ``unstash``. wsync.sync.comparison runs between the two."""
        self.require()
        saved = TrainerRecord(info=self.record.info.model_copy(), params=list(self.record.params),
                              snapshots=list(self.record.snapshots), held=self.record.held.copy())
        self._loaded(self.caller.get(self._actor().call("stash"), "trainer stash"))
        self.record.snapshots = []
        return saved

    def unstash(self, saved: TrainerRecord) -> TrainerInfo:
        """The stashed state back, as it was (weights, version, held patches, delta snapshots)."""
        self.caller.get(self._actor().call("unstash"), "trainer unstash")
        self.record = saved
        self._version_changed()
        return self.record.info

    def require(self) -> None:
        if not self.record.info.loaded:
            raise Conflict("the trainer has no model loaded: POST /v1/trainer/load first", field="trainer")

    def _loaded(self, info: TrainerInfo) -> TrainerInfo:
        """A (re)load: new params, no held patches; snapshots are the actor's (a reload drops none)."""
        params = self.caller.get(self._actor().call("param_metas"), "trainer info") if info.loaded else []
        self.record.info, self.record.params = info, params
        self.record.held.clear()
        self._version_changed()
        return info

    def _version_changed(self) -> None:
        """Tell the observer (``trainer.version``); every version change ends here."""
        info = self.record.info
        notify(self.observer, "trainer.version", {"version": info.version, "model": info.model, "dtype": info.dtype})

    def spec_dicts(self) -> dict[str, dict]:
        """The trainer's parameters by name, as the inline-patch checks take them."""
        return {m.name: m.to_dict() for m in self.record.params}

    # ---- weights ------------------------------------------------------------------------
    def step(self, req: TrainerStep) -> TrainerStepResult:
        self.require()
        out: TrainerStepResult = self.caller.get(self._actor().call(
            "step", f"s-{uuid.uuid4().hex[:10]}", req.texts, req.optimizer, req.lr, req.steps), "trainer step",
            self.settings.sync_timeout_s)
        self.record.info.version = out.version
        self._version_changed()
        return out

    def prepare_patch(self, req: PatchPrepare, tensors: list | None = None) -> PatchInfo:
        """Apply a patch to the trainer and record it. ``tensors``: validated inline SparsePatches."""
        self.require()
        specs = self.record.specs()
        if req.kind.value == "reference" and req.param not in specs:
            raise InvalidInput(f"no parameter {req.param!r} in the trainer's model", field="param", rule="name_exists")
        for i, name in enumerate(req.params or []):
            if name not in specs:
                raise InvalidInput(f"no parameter {name!r} in the trainer's model", field=f"params.{i}",
                                   rule="name_exists")
        patch_id = f"p-{uuid.uuid4().hex[:10]}"
        spec = req.model_dump(exclude={"kind", "patches"})
        if tensors is not None:
            spec["patches"] = tensors
        out = self.caller.get(self._actor().call("prepare_patch", patch_id, req.kind.value, spec), "prepare patch",
                              self.settings.sync_timeout_s)
        info = self._record_patch(PatchInfo(id=patch_id, kind=req.kind, created_at=utcnow(), **out))
        self.record.info.version = patch_id
        self._version_changed()
        return info

    def prepare_delta(self, base_version: str) -> PatchInfo:
        """A patch holding exactly what changed between ``base_version`` and the trainer's weights."""
        patch_id = f"p-{uuid.uuid4().hex[:10]}"
        out = self.caller.get(self._actor().call("prepare_delta", patch_id, base_version), "delta",
                              self.settings.sync_timeout_s)
        return self._record_patch(PatchInfo(id=patch_id, kind="delta", created_at=utcnow(), **out))

    def holds(self, patch_id: str) -> bool:
        """Whether the trainer still holds this patch (a reset or reload drops them; it keeps the newest
        MAX_HELD_PATCHES)."""
        return patch_id in self.record.held

    def _record_patch(self, info: PatchInfo) -> PatchInfo:
        self.store.add_patch(info)
        self.record.held[info.id] = None
        while len(self.record.held) > MAX_HELD_PATCHES:
            self.record.held.popitem(last=False)
        return info

    def mark_synced(self, version: str, patch: PatchInfo | None, serving: list[str]) -> None:
        """Engines serve ``version`` now (and ``serving`` between them): the trainer keeps the right
        snapshots for later deltas."""
        self.record.snapshots = self.caller.get(self._actor().call(
            "mark_synced", version, patch.id if patch else None, patch.base_version if patch else None,
            serving), "snapshot")

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[dict]:
        self.require()
        return self.caller.get(self._actor().call("generate", prompts, max_new_tokens), "trainer generate",
                               self.settings.sync_timeout_s)

    def gpu_uuid(self) -> str | None:
        """The physical GPU the trainer's weights live on (None on CPU, or when the actor cannot say).
        Creates the trainer actor if none exists yet: an engine's transport depends on it."""
        if self.actors.device != "cuda":
            return None
        if self._gpu_uuid is None or self._gpu_uuid[0] is not self.actor:
            try:
                uuid = self.caller.get(self._actor().call("gpu_uuid"), "trainer GPU")
            except Exception:  # noqa: BLE001 - a trainer that cannot say: no same-GPU transport
                uuid = None
            self._gpu_uuid = (self.actor, uuid)
        return self._gpu_uuid[1]

    def gpu_memory(self) -> dict | None:
        """The trainer GPU's memory counters (free, total, allocated, param_bytes); None before a trainer
        actor exists or off CUDA."""
        if self.actor is None or self.actors.device != "cuda":
            return None
        return self.caller.get(self.actor.call("gpu_memory"), "trainer GPU memory")

    def kill(self) -> None:
        if self.actor is not None:
            self.actor.kill()
        self.actor = None
