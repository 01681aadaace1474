"""External trainers (publishers): the user's own training process registers its tensors under a slot,
then publishes to engines the service runs; the service coordinates and records each publish as a sync
job (wsync.sync.external, wsync.sync.publishing). Protocol: docs/PUBLISHER.md."""

from __future__ import annotations

import threading

from fastapi import APIRouter, Response, status

from wsync.errors import Conflict, NotFound
from wsync.jobs.locks import engine_lock
from wsync.schemas import EngineState, JobKind
from wsync.schemas.publish import (
    PublishAccepted,
    PublishDone,
    PublishRequest,
    TrainerRegister,
    TrainerSlot,
)
from wsync.sync.external import PublishOrder, plan_publish
from wsync.sync.publishing import run_publish
from wsync.transfer.sparse import SparseMeta

from .deps import FleetDep, RunnerDep

router = APIRouter(prefix="/v1/trainers", tags=["trainers"])


@router.post("", response_model=TrainerSlot, status_code=status.HTTP_201_CREATED,
             summary="Register your training process as a trainer (its tensors are checked against the engines)")
def register_trainer(req: TrainerRegister, fleet: FleetDep) -> TrainerSlot:
    ready = [r for r in fleet.engines.values() if r.info.state in (EngineState.ready, EngineState.busy)]
    one_per_model = list({r.info.model: r for r in ready}.values())
    return fleet.publishers.register(req, one_per_model).info()


@router.get("", response_model=list[TrainerSlot], summary="Live external trainers")
def list_trainers(fleet: FleetDep) -> list[TrainerSlot]:
    return [s.info() for s in fleet.publishers.list()]


@router.get("/{trainer_id}", response_model=TrainerSlot, summary="One external trainer")
def get_external_trainer(trainer_id: str, fleet: FleetDep) -> TrainerSlot:
    return fleet.publishers.get(trainer_id).info()


@router.post("/{trainer_id}/heartbeat", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
             summary="Renew the slot's lease")
def heartbeat_trainer(trainer_id: str, fleet: FleetDep) -> Response:
    fleet.publishers.heartbeat(trainer_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete("/{trainer_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               summary="Free the slot (a publish still running fails)")
def delete_trainer(trainer_id: str, fleet: FleetDep) -> Response:
    fleet.publishers.delete(trainer_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{trainer_id}/publish", response_model=PublishAccepted, status_code=status.HTTP_202_ACCEPTED,
             summary="Publish: the engines join your rendezvous as ranks 1..N and receive what you send (a job)")
def publish_weights(trainer_id: str, req: PublishRequest, fleet: FleetDep, runner: RunnerDep) -> PublishAccepted:
    slot = fleet.publishers.heartbeat(trainer_id)
    recs = fleet.ready_engines(req.engine_ids)
    plan, mode, fallback, transports = plan_publish(fleet.publishers, slot, req, recs)
    sparse = [SparseMeta.from_dict(m.model_dump()) for m in req.sparse_metas] if mode == "sparse" and \
        req.sparse_metas else None
    request = req.model_dump(mode="json", exclude={"sparse_metas"})
    request |= {"trainer": slot.name, "trainer_id": slot.id, "plan": plan, "mode": mode, "fallback": fallback}
    kind = JobKind.sync_dense if mode == "dense" else JobKind.sync_sparse
    order = PublishOrder(
        slot=slot, job_id="", engine_ids=req.engine_ids, transports=transports, mode=mode, requested=req.requested,
        version=req.version, base_version=req.base_version if mode == "sparse" else None, fallback=fallback,
        rendezvous=req.rendezvous.model_dump(), bucket_bytes=req.bucket_bytes, sparse_metas=sparse)
    accepted = threading.Event()

    def job(ctx):
        accepted.wait(30)  # the order knows its job id and the slot lists it before the run starts
        return run_publish(fleet, ctx, order)

    info = runner.submit(kind, request, [engine_lock(e) for e in req.engine_ids], job)
    order.job_id = info.id
    slot.publishes[info.id] = order
    accepted.set()
    return PublishAccepted(id=info.id, plan=plan, mode=mode, fallback=fallback)


@router.post("/{trainer_id}/publish/{job_id}/done", status_code=status.HTTP_204_NO_CONTENT,
             response_class=Response, summary="Report the end of your send (stats + fingerprints, or error)")
def publish_done(trainer_id: str, job_id: str, body: PublishDone, fleet: FleetDep) -> Response:
    slot = fleet.publishers.heartbeat(trainer_id)
    order = slot.publishes.get(job_id)
    if order is None:
        raise NotFound(f"trainer {trainer_id} has no running publish {job_id!r}", field="job_id")
    if order.handle.done.done():
        raise Conflict(f"publish {job_id} already ended", field="job_id")
    if body.error is None and body.version not in (None, order.version):
        raise Conflict(f"done reports version {body.version!r}, the publish is {order.version!r}", field="version")
    order.handle.report(body.model_dump())
    return Response(status_code=status.HTTP_204_NO_CONTENT)
