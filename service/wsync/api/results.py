from __future__ import annotations

from fastapi import APIRouter

from wsync.errors import NotFound
from wsync.schemas import JobKind, Page, ResultInfo

from .deps import Limit, Offset, StoreDep

router = APIRouter(prefix="/v1/results", tags=["results"])


@router.get("", response_model=Page[ResultInfo], summary="Finished results, newest first (what dashboards poll)")
def list_results(store: StoreDep, kind: JobKind | None = None, limit: Limit = 50, offset: Offset = 0) -> Page[ResultInfo]:
    items, total = store.list_results(kind=kind, limit=limit, offset=offset)
    return Page[ResultInfo](items=items, total=total, limit=limit, offset=offset)


@router.get("/{result_id}", response_model=ResultInfo, summary="One result")
def get_result(result_id: str, store: StoreDep) -> ResultInfo:
    res = store.get_result(result_id)
    if res is None:
        raise NotFound(f"no result {result_id!r}", field="result_id")
    return res
