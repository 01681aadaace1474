from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from .common import ResponseModel, UtcDatetime, WireModel
from .text import Text


class EngineKind(StrEnum):
    reference = "reference"
    vllm = "vllm"


class EngineState(StrEnum):
    starting = "starting"
    ready = "ready"
    busy = "busy"
    failed = "failed"
    stopped = "stopped"


class EngineLaunch(WireModel):
    kind: EngineKind = Field(default=EngineKind.reference, description="Engine implementation.")
    model: str | None = Field(
        default=None,
        description="Local HF folder or hub id. Defaults to the trainer's model, else the embedded default.",
    )
    name: str | None = Field(default=None, max_length=64, description="Optional human label.")
    gpu_memory_utilization: float = Field(default=0.5, gt=0.0, le=1.0, description="vLLM only.")
    enforce_eager: bool = Field(default=True, description="vLLM only: disable CUDA graphs.")
    sync_route: Literal["direct", "native"] = Field(
        default="native",
        description="vLLM only. 'native' (default): vLLM's own weight-transfer API (flat_int32 sparse only). "
                    "'direct': wsync's wire straight into vLLM's runtime parameters through a name-and-slice "
                    "map built once (fused qkv / gate_up handled; any sparse encoding); an engine whose model "
                    "is not mapped falls back to 'native' and says why in details.")
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        default=None, description="Weights' dtype. Default: the trainer's (bfloat16 when none is loaded); a "
                                  "different one than the loaded trainer's is refused (409, dtype_match). An "
                                  "external trainer must publish the same.")
    wait: bool = Field(default=True, description="Answer once the engine is ready (200/201 with the engine) if that "
                       "happens within the server's wait bound, else 202 with the launch job (as with wait=false).")

    model_config = {
        "json_schema_extra": {"examples": [{"kind": "reference"}, {"kind": "vllm", "gpu_memory_utilization": 0.6}]}
    }


class EngineInfo(ResponseModel):
    id: str
    kind: EngineKind
    model: str
    name: str | None = None
    state: EngineState
    version: str | None = Field(default=None, description="Weight version the engine serves.")
    device: str | None = None
    created_at: UtcDatetime
    dtype: str | None = Field(default=None, description="The dtype the engine holds its weights in.")
    error: str | None = None
    syncs: int = 0
    quarantined: str | None = Field(default=None, description="Why no sparse sync is accepted until a dense "
                                    "reseed (a fault was blamed on this engine).")
    details: dict = Field(default_factory=dict)


class GenerateRequest(WireModel):
    prompts: list[Text] = Field(min_length=1, max_length=256)
    max_new_tokens: int = Field(default=1, ge=1, le=256)


class GenerateResponse(ResponseModel):
    engine_id: str
    version: str | None = Field(default=None, description="The weight version that generated (None: unknown).")
    generations: list[dict]
