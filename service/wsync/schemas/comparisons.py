from __future__ import annotations

from pydantic import Field

from .common import REFERENCE_PROMPTS, ResponseModel, WireModel
from .engines import EngineKind
from .text import Text


class ComparisonCreate(WireModel):
    engine_kind: EngineKind = EngineKind.reference
    model: str | None = Field(default=None, description="Default: the trainer's model, else the embedded default.")
    prompts: list[Text] = Field(default_factory=lambda: list(REFERENCE_PROMPTS), min_length=1, max_length=256)
    rows: int = Field(default=32, ge=1, le=65536)
    max_new_tokens: int = Field(default=1, ge=1, le=64)
    gpu_memory_utilization: float = Field(default=0.5, gt=0.0, le=1.0)
    keep_engines: bool = Field(default=False, description="Keep the two fresh engines afterwards.")

    model_config = {"json_schema_extra": {"examples": [{}, {"engine_kind": "vllm"}]}}


class Verdicts(ResponseModel):
    baseline_equal: bool
    patch_selection_equal: bool
    patch_digest_equal: bool
    after_equal: bool
    any_output_changed: bool


class PhaseReport(ResponseModel):
    engine_id: str
    trainer_before: list[list[int]]
    before: list[list[int]]
    after: list[list[int]]
    trainer_after: list[list[int]]
    selected_token_ids: list[int]
    patch_digest: str
    payload_bytes: int
    wire_bytes: int
    send_ms: float
    total_ms: float
    verified: bool | None = None
    transport: str | None = None  # what the engine was synced over (gloo, nccl, vllm_native, cuda_ipc)


class ComparisonReport(ResponseModel):
    ok: bool
    model: str
    engine_kind: EngineKind
    prompts: list[str]
    verdicts: Verdicts
    trainer_engine_baseline_equal: bool
    dense_payload_mb: float
    sparse_payload_mb: float
    dense_send_ms: float
    sparse_send_ms: float
    dense: PhaseReport
    sparse: PhaseReport
