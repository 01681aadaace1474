"""Rollouts: sampled completions with logprobs from an engine, stamped with the weight version that
produced them (the optional engine contract method engines.contract.SamplingEngine.sample)."""

from __future__ import annotations

from fastapi import APIRouter

from wsync.jobs.locks import engine_lock
from wsync.schemas.publish import SampleRequest, SampleResponse

from .deps import FleetDep

router = APIRouter(prefix="/v1/engines", tags=["engines"])


@router.post("/{engine_id}/sample", response_model=SampleResponse,
             summary="Sample n completions per prompt with per-token logprobs (RL rollouts), version-stamped")
def sample_on_engine(engine_id: str, req: SampleRequest, fleet: FleetDep) -> SampleResponse:
    fleet.get_engine(engine_id)
    with fleet.holding(engine_lock(engine_id)):
        version, samples = fleet.sample(engine_id, req.prompts, req.n, req.max_new_tokens, req.temperature,
                                        req.top_k, req.seed)
    return SampleResponse(engine_id=engine_id, version=version, samples=samples)
