from __future__ import annotations

from fastapi import APIRouter, Response, status

from wsync.jobs.locks import engine_lock
from wsync.schemas import EngineInfo, EngineLaunch, GenerateRequest, GenerateResponse, Page

from .deps import FleetDep
from .limits import check_engine_count

router = APIRouter(prefix="/v1/engines", tags=["engines"])


@router.post("", response_model=EngineInfo, status_code=status.HTTP_201_CREATED,
             summary="Launch an inference engine (reference or vLLM) as a Ray actor")
def launch(req: EngineLaunch, fleet: FleetDep, response: Response) -> EngineInfo:
    check_engine_count(len(fleet.engines), fleet.settings.max_engines)
    info = fleet.launch_engine(req)
    if not req.wait:
        response.status_code = status.HTTP_202_ACCEPTED
    return info


@router.get("", response_model=Page[EngineInfo], summary="List engines")
def list_engines(fleet: FleetDep) -> Page[EngineInfo]:
    items = fleet.list_engines()
    return Page[EngineInfo](items=items, total=len(items), limit=len(items), offset=0)


@router.get("/{engine_id}", response_model=EngineInfo, summary="One engine")
def get_engine(engine_id: str, fleet: FleetDep) -> EngineInfo:
    return fleet.get_engine(engine_id).info


@router.delete("/{engine_id}", response_model=EngineInfo, summary="Stop an engine and free its GPU")
def delete_engine(engine_id: str, fleet: FleetDep) -> EngineInfo:
    fleet.get_engine(engine_id)
    with fleet.holding(engine_lock(engine_id)):
        return fleet.delete_engine(engine_id)


@router.post("/{engine_id}/generate", response_model=GenerateResponse, summary="Greedy generation on an engine")
def generate(engine_id: str, req: GenerateRequest, fleet: FleetDep) -> GenerateResponse:
    fleet.get_engine(engine_id)
    with fleet.holding(engine_lock(engine_id)):
        version = fleet.get_engine(engine_id).info.version  # the weights that generate (stamps rollouts)
        gens = fleet.generate(engine_id, req.prompts, req.max_new_tokens)
    return GenerateResponse(engine_id=engine_id, generations=gens, version=version)
