from __future__ import annotations

from fastapi import APIRouter

from wsync.jobs.locks import trainer_lock
from wsync.schemas import JobKind, TrainerInfo, TrainerLoad, TrainerStep, TrainerStepResult
from wsync.sync.launch import run_load

from .deps import FleetDep, RunnerDep, SettingsDep, StoreDep
from .longops import ACCEPTED_DOC, accepted, finished

router = APIRouter(prefix="/v1/trainer", tags=["trainer"])


@router.get("", response_model=TrainerInfo, summary="The trainer's model and weight version")
def get_trainer(fleet: FleetDep) -> TrainerInfo:
    return fleet.trainer.info


@router.post("/load", response_model=TrainerInfo, responses=ACCEPTED_DOC,
             summary="Load a model into the trainer (default: embedded; a job)")
def load_trainer(req: TrainerLoad, fleet: FleetDep, runner: RunnerDep, store: StoreDep, settings: SettingsDep):
    """The model is resolved now (a bad one is a 422 naming ``model``); the load itself is a job
    (``trainer_load``): 202 with it, or with ``wait=true`` the trainer once loaded within the bound. A
    load that fails while the client waits answers its error, as a direct call would."""
    model = fleet.trainer.resolve_model(req.model)
    failure: list[BaseException] = []
    job = runner.submit(JobKind.trainer_load, req.model_dump(mode="json"), [trainer_lock()],
                        lambda ctx: run_load(fleet, ctx, model, req.dtype, failure.append))
    done = finished(store, job, settings.request_wait_s) if req.wait else None
    if done is None:
        return accepted(store, job)
    if failure:
        raise failure[0]
    return fleet.trainer.info


@router.post("/reset", response_model=TrainerInfo, summary="Reset the trainer to its baseline checkpoint")
def reset_trainer(fleet: FleetDep) -> TrainerInfo:
    with fleet.holding(trainer_lock()):
        return fleet.trainer.reset()


@router.post("/step", response_model=TrainerStepResult,
             summary="A real optimizer step on the trainer (then POST /v1/sync/sparse with delta=true)")
def step_trainer(req: TrainerStep, fleet: FleetDep) -> TrainerStepResult:
    with fleet.holding(trainer_lock()):
        return fleet.trainer.step(req)
