from __future__ import annotations

from fastapi import APIRouter, status

from wsync.errors import InvalidInput
from wsync.jobs.locks import trainer_lock
from wsync.schemas import ComparisonCreate, JobInfo, JobKind
from wsync.sync.comparison import run_comparison

from .deps import FleetDep, RunnerDep

router = APIRouter(prefix="/v1/comparisons", tags=["comparisons"])


@router.post("", response_model=JobInfo, status_code=status.HTTP_202_ACCEPTED,
             summary="Dense vs sparse, end to end, on fresh engines (vLLM's rlhf_sparse_nccl story)")
def create_comparison(req: ComparisonCreate, fleet: FleetDep, runner: RunnerDep) -> JobInfo:
    if req.engine_kind.value == "vllm" and fleet.device != "cuda":
        raise InvalidInput("vLLM engines need a GPU; this cluster has none", field="engine_kind")
    return runner.submit(JobKind.comparison, req.model_dump(mode="json"), [trainer_lock()],
                         lambda ctx: run_comparison(fleet, ctx, req))
