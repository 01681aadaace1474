"""Engines. A launch is a job (``engine_launch``): the engine is listed at once (``starting``) and the
answer is 202 with the job, or with ``wait=true`` the engine itself once ready within the server's
wait bound."""

from __future__ import annotations

from fastapi import APIRouter, status

from wsync.jobs.locks import engine_lock
from wsync.schemas import EngineInfo, EngineLaunch, GenerateRequest, GenerateResponse, JobKind, Page
from wsync.sync.launch import run_launch

from .deps import FleetDep, Limit, Offset, RunnerDep, SettingsDep, StoreDep
from .limits import check_engine_count
from .longops import ACCEPTED_DOC, accepted, finished

router = APIRouter(prefix="/v1/engines", tags=["engines"])


@router.post("", response_model=EngineInfo, status_code=status.HTTP_201_CREATED, responses=ACCEPTED_DOC,
             summary="Launch an inference engine (reference or vLLM) as a Ray actor (a job)")
def launch_engine(req: EngineLaunch, fleet: FleetDep, runner: RunnerDep, store: StoreDep,
                  settings: SettingsDep):
    """Refusals answer now, before any job: the engine count (409 max_engines), the dtype (409
    dtype_match), a colocated vLLM engine that does not fit (409 gpu_memory) or cannot be placed (409
    gpu_capacity). Then the engine is listed (``starting``) and its start is an ``engine_launch`` job."""
    check_engine_count(len(fleet.engines), fleet.settings.max_engines)
    rec = fleet.create_engine(req)  # listed now, so a client that gives up still sees it with its state
    request = {**req.model_dump(mode="json"), "engine_id": rec.id}
    job = runner.submit(JobKind.engine_launch, request, [engine_lock(rec.id)], lambda ctx: run_launch(fleet, ctx, rec))
    if req.wait and finished(store, job, settings.request_wait_s) is not None:
        return rec.info  # ready, or failed with its error
    return accepted(store, job)


@router.get("", response_model=Page[EngineInfo], summary="List engines, in launch order")
def list_engines(fleet: FleetDep, limit: Limit = 50, offset: Offset = 0) -> Page[EngineInfo]:
    items = fleet.list_engines()
    return Page[EngineInfo](items=items[offset:offset + limit], total=len(items), limit=limit, offset=offset)


@router.get("/{engine_id}", response_model=EngineInfo, summary="One engine")
def get_engine(engine_id: str, fleet: FleetDep) -> EngineInfo:
    return fleet.get_engine(engine_id).info


@router.delete("/{engine_id}", response_model=EngineInfo, summary="Stop an engine and free its GPU")
def delete_engine(engine_id: str, fleet: FleetDep) -> EngineInfo:
    fleet.get_engine(engine_id)
    with fleet.holding(engine_lock(engine_id)):
        return fleet.delete_engine(engine_id)


@router.post("/{engine_id}/generate", response_model=GenerateResponse, summary="Greedy generation on an engine")
def generate_on_engine(engine_id: str, req: GenerateRequest, fleet: FleetDep) -> GenerateResponse:
    fleet.get_engine(engine_id)
    with fleet.holding(engine_lock(engine_id)):
        version = fleet.get_engine(engine_id).info.version  # the weights that generate (stamps rollouts)
        gens = fleet.generate(engine_id, req.prompts, req.max_new_tokens)
    return GenerateResponse(engine_id=engine_id, generations=gens, version=version)
