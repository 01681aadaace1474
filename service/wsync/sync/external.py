"""External trainers: the user's own process as the trainer (a publisher; wsync_client.publisher).

A publisher holds a **slot** (a name, e.g. "policy") under a lease: registering, heartbeats, publishes
and ``done`` renew it; a slot whose lease ran out is free (a second publisher may take the name; the
first one's calls then answer 404). Registration checks the publisher's tensors against the engines'
checkpoint layout (``wsync.publish.names.check_layout``) before any byte can move: 422 naming the tensor.

A publish is planned here at submit time (``plan_publish``: engines ready, their transport, the layout,
the baseline of a sparse publish) and run by wsync.sync.publishing. Its trainer side is an
``ExternalHandle`` behind the ``External`` transport: the publisher hosts the group and sends; the
handle's calls resolve when the publisher reports ``done`` (stats and the fingerprints the engines must
show) or fail with its error.

Methods take no locks of the job runner; the registry's own guard protects the slot map."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from wsync.engines.contract import EngineDetails
from wsync.errors import Conflict, InvalidInput, NotFound
from wsync.publish.names import LayoutError, check_layout
from wsync.schemas.common import utcnow
from wsync.schemas.publish import PublishRequest, TrainerRegister, TrainerSlot
from wsync.transfer.meta import TensorMeta, TransferStats
from wsync.transfer.sparse import SparseMeta

from .records import EngineRecord
from .transports import NoTransport, TrainerSide, Transport, choose


class PublisherError(RuntimeError):
    """The publisher reported a failure, went away, or never reported."""


class ExternalHandle:
    """The trainer side of one publish, in the shape of an actor handle (``call``/``kill``): pending
    calls are Futures. ``open_group``/``close_group`` resolve at once (the publisher opens and closes its
    own side); ``send_dense``/``send_sparse`` resolve with the publisher's TransferStats at ``done``;
    ``fingerprint`` with the fingerprints it reported."""

    def __init__(self) -> None:
        self.done: Future = Future()

    def report(self, body: dict[str, Any]) -> None:
        """The publisher's ``done`` (idempotent: a second report is ignored)."""
        if self.done.done():
            return
        if body.get("error"):
            self.done.set_exception(PublisherError(f"the publisher reported: {body['error']}"))
        else:
            self.done.set_result(body)

    def fail(self, message: str) -> None:
        if not self.done.done():
            self.done.set_exception(PublisherError(message))

    def _then(self, fn) -> Future:
        out: Future = Future()

        def relay(src: Future) -> None:
            exc = src.exception()
            if exc is not None:
                out.set_exception(exc)
            else:
                try:
                    out.set_result(fn(src.result()))
                except Exception as err:  # noqa: BLE001 - a malformed report fails the call
                    out.set_exception(err)

        self.done.add_done_callback(relay)
        return out

    def call(self, method: str, *args: Any, **kwargs: Any) -> Future:
        if method in ("send_dense", "send_sparse"):
            return self._then(lambda body: TransferStats(**{k: v for k, v in (body.get("stats") or {}).items()
                                                            if k in TransferStats.__dataclass_fields__}))
        if method == "fingerprint":
            names = args[0] if args else None
            return self._then(lambda body: {n: f for n, f in body.get("fingerprints", {}).items()
                                            if names is None or n in names})
        if method in ("open_group", "close_group"):
            done: Future = Future()
            done.set_result(None)
            return done
        raise AttributeError(f"an external trainer has no {method!r}")

    def kill(self) -> None:
        self.fail("the publish was abandoned")


@dataclass
class PublishOrder:
    """One accepted publish: what the engines receive and from where."""

    slot: Slot
    job_id: str
    engine_ids: list[str]
    transports: list[Transport]
    mode: str
    requested: str
    version: str
    base_version: str | None
    fallback: str | None
    rendezvous: dict[str, Any]
    bucket_bytes: int
    sparse_metas: list[SparseMeta] | None
    handle: ExternalHandle = field(default_factory=ExternalHandle)


@dataclass
class Slot:
    id: str
    name: str
    host: str
    device: str
    gpu_uuid: str | None
    metas: list[TensorMeta]
    lease_s: float
    created_at: datetime
    lease_until: float = 0.0
    checked_models: set[str] = field(default_factory=set)
    version: str | None = None
    gone: str | None = None  # why the slot ended (deleted, lease expired, taken over)
    publishes: dict[str, PublishOrder] = field(default_factory=dict)

    def renew(self) -> None:
        self.lease_until = time.monotonic() + self.lease_s

    @property
    def live(self) -> bool:
        return self.gone is None and time.monotonic() < self.lease_until

    def lost(self) -> str | None:
        """Why this publisher is gone (None while it holds its lease)."""
        if self.gone is not None:
            return self.gone
        if time.monotonic() >= self.lease_until:
            return (f"publisher {self.name!r} ({self.id}) lost its lease: no heartbeat for {self.lease_s:g} s "
                    "(disconnected mid-sync?)")
        return None

    def info(self) -> TrainerSlot:
        left = max(0.0, self.lease_until - time.monotonic())
        return TrainerSlot(id=self.id, name=self.name, host=self.host, device=self.device,
                           num_tensors=len(self.metas), num_params=sum(m.numel for m in self.metas),
                           checked_models=sorted(self.checked_models), lease_s=self.lease_s,
                           lease_expires_at=utcnow() + timedelta(seconds=left), version=self.version,
                           created_at=self.created_at)


class Publishers:
    """The slots of external trainers, by id. ``engine_metas(rec)`` gives an engine's checkpoint metas."""

    def __init__(self, lease_s: float, engine_metas) -> None:
        self.lease_s = lease_s
        self._engine_metas = engine_metas
        self._slots: dict[str, Slot] = {}
        self._layouts: dict[str, list[TensorMeta]] = {}  # engine model -> its checkpoint metas
        self._guard = threading.RLock()

    # ---- slots --------------------------------------------------------------------------------------
    def register(self, req: TrainerRegister, engines: list[EngineRecord]) -> Slot:
        """A new slot for ``req.name`` (409 while a live publisher holds it), its tensors checked against
        every ready engine's model (422 naming the tensor)."""
        metas = [TensorMeta(p.name, p.dtype, list(p.shape)) for p in req.params]
        slot = Slot(id=f"t-{uuid.uuid4().hex[:10]}", name=req.name, host=req.host, device=req.device,
                    gpu_uuid=req.gpu_uuid, metas=metas, lease_s=self.lease_s, created_at=utcnow())
        for rec in engines:
            self.check_layout(slot, rec)
        with self._guard:
            holder = next((s for s in self._slots.values() if s.name == req.name and s.live), None)
            if holder is not None:
                raise Conflict(f"trainer slot {req.name!r} is held by a live publisher ({holder.id}, host "
                               f"{holder.host}); it frees on DELETE /v1/trainers/{holder.id} or when its lease "
                               f"({holder.lease_s:g} s without a heartbeat) runs out", field="name", rule="slot_free")
            for old in [s for s in self._slots.values() if s.name == req.name]:
                self._end(old, f"publisher {old.id} lost slot {req.name!r}: its lease ran out and {slot.id} took it")
            slot.renew()
            self._slots[slot.id] = slot
        return slot

    def get(self, slot_id: str) -> Slot:
        """The live slot (404 when unknown, deleted or expired)."""
        with self._guard:
            slot = self._slots.get(slot_id)
            if slot is not None and slot.lost():
                self._end(slot, slot.lost() or "")
                slot = None
        if slot is None:
            raise NotFound(f"no live trainer {slot_id!r} (deleted, or its lease ran out: register again)",
                           field="trainer_id")
        return slot

    def heartbeat(self, slot_id: str) -> Slot:
        slot = self.get(slot_id)
        slot.renew()
        return slot

    def delete(self, slot_id: str) -> Slot:
        slot = self.get(slot_id)
        with self._guard:
            self._end(slot, f"publisher {slot.id} deleted its slot {slot.name!r} mid-publish")
        return slot

    def list(self) -> list[Slot]:
        with self._guard:
            return [s for s in self._slots.values() if s.live]

    def _end(self, slot: Slot, why: str) -> None:
        slot.gone = slot.gone or why
        self._slots.pop(slot.id, None)
        for order in slot.publishes.values():
            order.handle.fail(why)

    # ---- layout -------------------------------------------------------------------------------------
    def check_layout(self, slot: Slot, rec: EngineRecord, field: str = "params") -> None:
        """The publisher's tensors against ``rec``'s model, once per model (422 naming the tensor)."""
        model = rec.info.model
        if model in slot.checked_models:
            return
        with self._guard:
            engine = self._layouts.get(model)
        if engine is None:
            engine = list(self._engine_metas(rec))
            with self._guard:
                self._layouts[model] = engine
        try:
            check_layout(slot.metas, engine)
        except LayoutError as exc:
            index = next((i for i, m in enumerate(slot.metas) if m.name == exc.tensor), None)
            raise InvalidInput(f"tensor {exc.tensor!r} does not match engine {rec.id}'s model {model}: {exc.rule}: "
                               f"{exc.detail}", field=f"{field}.{index}" if index is not None else field,
                               rule=f"layout_{exc.rule}") from None
        slot.checked_models.add(model)


def plan_publish(publishers: Publishers, slot: Slot, req: PublishRequest,
                 recs: list[EngineRecord]) -> tuple[dict[str, str], str, str | None, list[Transport]]:
    """Submit-time checks of a publish (re-run when its job starts): the rendezvous' world size, each
    engine's transport for this publisher, the layout, and a sparse publish's baseline. A sparse
    request onto an engine that does not serve ``base_version`` is refused (409) unless it is ``auto``:
    then the whole publish goes dense, saying why (one stream to all engines; never a patch onto other
    weights). Returns (plan per engine, wire mode, fallback, transports)."""
    if req.rendezvous.world_size != len(recs) + 1:
        raise InvalidInput(f"rendezvous.world_size is {req.rendezvous.world_size}, but {len(recs)} engine(s) "
                           "join the publisher: it must be len(engine_ids) + 1", field="rendezvous.world_size")
    side = TrainerSide(device=slot.device, gpu_uuid=slot.gpu_uuid, kind="external")
    transports = []
    for i, rec in enumerate(recs):
        publishers.check_layout(slot, rec)
        try:
            transport = choose(_details(rec), side)
        except NoTransport as exc:
            raise Conflict(f"engine {rec.id}: {exc}", field=f"engine_ids.{i}", rule="transport") from None
        if transport.backend != req.rendezvous.backend:
            raise InvalidInput(f"engine {rec.id} receives from a {slot.device} publisher over {transport.backend}, "
                               f"the rendezvous names {req.rendezvous.backend}", field="rendezvous.backend")
        transports.append(transport)
    mode, fallback = req.mode, None
    if mode == "sparse":
        if not req.sparse_metas:
            raise InvalidInput("a sparse publish needs sparse_metas", field="sparse_metas")
        behind = [r for r in recs if r.info.version is None or r.info.version != req.base_version]
        if behind and req.requested != "auto":
            rec = behind[0]
            raise Conflict(f"engine {rec.id} serves weights {rec.info.version!r} but the patch applies on top of "
                           f"{req.base_version!r}; publish dense (or auto)", field="engine_ids",
                           rule="baseline_match")
        if behind:
            mode = "dense"
            fallback = "; ".join(f"engine {r.id} serves {r.info.version!r}, not the baseline {req.base_version!r}: "
                                 "dense" for r in behind)
    return {r.id: mode for r in recs}, mode, fallback or req.fallback, transports


def _details(rec: EngineRecord) -> EngineDetails:
    d = rec.info.details
    return EngineDetails(kind=d.get("kind", rec.info.kind.value), model=rec.info.model,
                         device=d.get("device", rec.info.device or "cpu"), num_tensors=d.get("num_tensors", 0),
                         transports=list(d.get("transports", [])), gpu_uuid=d.get("gpu_uuid"))
