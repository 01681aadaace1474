"""Sync jobs: the handler runs the submit-time checks (wsync.sync.checks) and answers 202 with the job;
the job re-runs them at start and runs the sync (wsync.sync.run)."""

from __future__ import annotations

from fastapi import APIRouter, status

from wsync.inline import inline_patches
from wsync.jobs.locks import sync_locks
from wsync.schemas import JobInfo, JobKind, PatchKind, PatchPrepare, SyncDense, SyncSparse
from wsync.sync.checks import SyncOrder, check_sync
from wsync.sync.run import run_sync

from .deps import FleetDep, RunnerDep
from .limits import check_patch_elements

router = APIRouter(prefix="/v1/sync", tags=["sync"])


@router.post("/dense", response_model=JobInfo, status_code=status.HTTP_202_ACCEPTED,
             summary="Send every parameter to the engines (a job)")
def sync_dense(req: SyncDense, fleet: FleetDep, runner: RunnerDep) -> JobInfo:
    order = SyncOrder(mode="dense", engine_ids=req.engine_ids, bucket_bytes=req.bucket_bytes, verify=req.verify,
                      all_or_nothing=req.all_or_nothing)
    check_sync(fleet, order, settled=False)
    return runner.submit(JobKind.sync_dense, req.model_dump(mode="json"), sync_locks(req.engine_ids),
                         lambda ctx: run_sync(fleet, ctx, order))


@router.post("/sparse", response_model=JobInfo, status_code=status.HTTP_202_ACCEPTED,
             summary="Send only the changed elements of a patch to the engines (a job)")
def sync_sparse(req: SyncSparse, fleet: FleetDep, runner: RunnerDep) -> JobInfo:
    check_patch_elements(req.patches, fleet.settings.max_patch_elements)
    resources = sync_locks(req.engine_ids)
    order = SyncOrder(mode="sparse", engine_ids=req.engine_ids, patch_id=req.patch_id,
                      encoding=req.encoding.value, verify=req.verify, delta=req.delta,
                      all_or_nothing=req.all_or_nothing)
    # nothing queued that could still move these engines or the trainer: check everything now
    check_sync(fleet, order, settled=not runner.pending(resources))
    tensors = inline_patches(req.patches, fleet.trainer.spec_dicts()) if req.patches else None

    def job(ctx):
        if tensors is not None:
            ctx.event("applying the inline patch to the trainer")
            order.patch_id = fleet.trainer.prepare_patch(PatchPrepare(kind=PatchKind.inline, patches=req.patches),
                                                         tensors).id
        return run_sync(fleet, ctx, order)

    request = req.model_dump(mode="json", exclude={"patches"})
    if req.patches:
        request["inline_tensors"] = [p.name for p in req.patches]
    return runner.submit(JobKind.sync_sparse, request, resources, job)
