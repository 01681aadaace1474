from __future__ import annotations

from fastapi import APIRouter

from wsync.jobs.locks import trainer_lock
from wsync.schemas import TrainerInfo, TrainerLoad, TrainerStep, TrainerStepResult

from .deps import FleetDep

router = APIRouter(prefix="/v1/trainer", tags=["trainer"])


@router.get("", response_model=TrainerInfo, summary="The trainer's model and weight version")
def get_trainer(fleet: FleetDep) -> TrainerInfo:
    return fleet.trainer.info


@router.post("/load", response_model=TrainerInfo, summary="Load a model into the trainer (default: embedded)")
def load(req: TrainerLoad, fleet: FleetDep) -> TrainerInfo:
    with fleet.holding(trainer_lock()):
        return fleet.trainer.load(req.model, req.dtype)


@router.post("/reset", response_model=TrainerInfo, summary="Reset the trainer to its baseline checkpoint")
def reset(fleet: FleetDep) -> TrainerInfo:
    with fleet.holding(trainer_lock()):
        return fleet.trainer.reset()


@router.post("/step", response_model=TrainerStepResult,
             summary="A real optimizer step on the trainer (then POST /v1/sync/sparse with delta=true)")
def step(req: TrainerStep, fleet: FleetDep) -> TrainerStepResult:
    with fleet.holding(trainer_lock()):
        return fleet.trainer.step(req)
