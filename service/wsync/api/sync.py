from __future__ import annotations

from fastapi import APIRouter, status

from wsync.errors import NotFound
from wsync.fleet import engine_lock, trainer_lock
from wsync.inline import inline_patches
from wsync.orchestrate import check_sparse_baseline, run_sync
from wsync.schemas import JobInfo, JobKind, PatchKind, PatchPrepare, SyncDense, SyncSparse

from .deps import FleetDep, RunnerDep, StoreDep
from .limits import check_patch_elements

router = APIRouter(prefix="/v1/sync", tags=["sync"])


def _resources(engine_ids: list[str]) -> list[str]:
    return [trainer_lock(), *(engine_lock(e) for e in engine_ids)]


@router.post("/dense", response_model=JobInfo, status_code=status.HTTP_202_ACCEPTED,
             summary="Send every parameter to the engines (a job)")
def sync_dense(req: SyncDense, fleet: FleetDep, runner: RunnerDep) -> JobInfo:
    fleet.require_trainer()
    fleet.ready_engines(req.engine_ids)

    def job(ctx):
        return run_sync(fleet, ctx, "dense", req.engine_ids, bucket_bytes=req.bucket_bytes, verify=req.verify)

    return runner.submit(JobKind.sync_dense, req.model_dump(mode="json"), _resources(req.engine_ids), job)


@router.post("/sparse", response_model=JobInfo, status_code=status.HTTP_202_ACCEPTED,
             summary="Send only the changed elements of a patch to the engines (a job)")
def sync_sparse(req: SyncSparse, fleet: FleetDep, runner: RunnerDep, store: StoreDep) -> JobInfo:
    check_patch_elements(req.patches, fleet.settings.max_patch_elements)
    fleet.require_trainer()
    recs = fleet.ready_engines(req.engine_ids)
    resources = _resources(req.engine_ids)
    tensors = None
    if req.patch_id is not None:
        patch = store.get_patch(req.patch_id)
        if patch is None:
            raise NotFound(f"no patch {req.patch_id!r}", field="patch_id")
        if not runner.pending(resources):  # nothing queued that could still move these engines
            check_sparse_baseline(fleet, recs, patch.base_version)
    elif req.patches:
        tensors = inline_patches(req.patches, fleet.trainer_specs())
    elif not runner.pending(resources):  # delta: check what can be checked now
        fleet.prepare_delta_check(recs)

    def job(ctx):
        patch_id = req.patch_id
        if tensors is not None:
            ctx.event("applying the inline patch to the trainer")
            patch_id = fleet.prepare_patch(PatchPrepare(kind=PatchKind.inline, patches=req.patches), tensors).id
        return run_sync(fleet, ctx, "sparse", req.engine_ids, patch_id=patch_id, encoding=req.encoding.value,
                        verify=req.verify, delta=req.delta)

    request = req.model_dump(mode="json", exclude={"patches"})
    if req.patches:
        request["inline_tensors"] = [p.name for p in req.patches]
    return runner.submit(JobKind.sync_sparse, request, resources, job)
