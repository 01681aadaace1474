from __future__ import annotations

from fastapi import APIRouter, status

from wsync.errors import NotFound
from wsync.inline import inline_patches
from wsync.jobs.locks import trainer_lock
from wsync.schemas import Page, PatchInfo, PatchKind, PatchPrepare

from .deps import FleetDep, Limit, Offset, StoreDep
from .limits import check_patch_elements, check_random_patch

router = APIRouter(prefix="/v1/patches", tags=["patches"])


@router.post("", response_model=PatchInfo, status_code=status.HTTP_201_CREATED,
             summary="Prepare a patch: apply it to the trainer's weights and keep it for sparse syncs")
def prepare_patch(req: PatchPrepare, fleet: FleetDep) -> PatchInfo:
    check_patch_elements(req.patches, fleet.settings.max_patch_elements)
    fleet.trainer.require()
    if req.kind == PatchKind.random:
        check_random_patch(req.density, req.params, fleet.trainer.spec_dicts(), fleet.settings.max_patch_elements)
    tensors = inline_patches(req.patches, fleet.trainer.spec_dicts()) if req.kind == PatchKind.inline else None
    with fleet.holding(trainer_lock()):
        return fleet.trainer.prepare_patch(req, tensors)


@router.get("", response_model=Page[PatchInfo], summary="Patches, newest first")
def list_patches(store: StoreDep, limit: Limit = 50, offset: Offset = 0) -> Page[PatchInfo]:
    items, total = store.list_patches(limit=limit, offset=offset)
    return Page[PatchInfo](items=items, total=total, limit=limit, offset=offset)


@router.get("/{patch_id}", response_model=PatchInfo, summary="One patch")
def get_patch(patch_id: str, store: StoreDep) -> PatchInfo:
    info = store.get_patch(patch_id)
    if info is None:
        raise NotFound(f"no patch {patch_id!r}", field="patch_id")
    return info
