"""Pydantic wire models of the wsync HTTP API. No torch/ray imports: the SDK reuses them."""

from .common import REFERENCE_PROMPTS, ErrorBody, ErrorDetail, Health, Page, UtcDatetime, iso_utc, utcnow
from .comparisons import ComparisonCreate, ComparisonReport, PhaseReport, Verdicts
from .engines import EngineInfo, EngineKind, EngineLaunch, EngineState, GenerateRequest, GenerateResponse
from .jobs import JobInfo, JobKind, JobState, ResultInfo
from .patches import PatchInfo, PatchKind, PatchPrepare, PatchTensorInfo, TensorPatch
from .sync import EngineSyncReport, SparseEncoding, SyncDense, SyncReport, SyncSparse
from .trainer import ParamSpec, TrainerInfo, TrainerLoad, TrainerStep, TrainerStepResult

__all__ = [
    "REFERENCE_PROMPTS", "ErrorBody", "ErrorDetail", "Health", "Page", "UtcDatetime", "iso_utc", "utcnow",
    "ComparisonCreate", "ComparisonReport", "PhaseReport", "Verdicts",
    "EngineInfo", "EngineKind", "EngineLaunch", "EngineState", "GenerateRequest", "GenerateResponse",
    "JobInfo", "JobKind", "JobState", "ResultInfo",
    "PatchInfo", "PatchKind", "PatchPrepare", "PatchTensorInfo", "TensorPatch",
    "EngineSyncReport", "SparseEncoding", "SyncDense", "SyncReport", "SyncSparse",
    "ParamSpec", "TrainerInfo", "TrainerLoad", "TrainerStep", "TrainerStepResult",
]
