from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field, field_validator, model_validator

from .common import ResponseModel, WireModel
from .patches import TensorPatch


class SparseEncoding(StrEnum):
    """Sparse wire encodings (wsync.transfer.encodings). "gap" / "gap8" were called "delta" /
    "delta8" before; "delta" now only means a trainer-state diff (SyncSparse.delta)."""

    flat_int32 = "flat_int32"
    gap = "gap"
    gap8 = "gap8"
    bitmask = "bitmask"
    rows = "rows"
    auto = "auto"


# Deprecated request spellings of the gap encodings, still accepted on the API.
DEPRECATED_ENCODINGS = {"delta": SparseEncoding.gap, "delta8": SparseEncoding.gap8}


class SyncDense(WireModel):
    engine_ids: list[str] = Field(min_length=1, description="Engines to receive every parameter.")
    bucket_bytes: int | None = Field(default=None, ge=1024, description="Flat buffer size; default from settings.")
    verify: bool = Field(default=True, description="Compare weight fingerprints of trainer and engines afterwards.")
    all_or_nothing: bool = Field(default=False, description="If any engine fails, do not sync the others "
                                 "without it (default: the healthy engines commit, the failed ones are quarantined).")

    model_config = {"json_schema_extra": {"examples": [{"engine_ids": ["e-1a2b3c"]}]}}


class SyncSparse(WireModel):
    engine_ids: list[str] = Field(min_length=1)
    patch_id: str | None = Field(default=None, description="A patch prepared with POST /v1/patches.")
    patches: list[TensorPatch] | None = Field(default=None,
                                               description="Inline patches (applied to the trainer, then sent).")
    delta: bool = Field(default=False, description="Diff the trainer's weights against the version the engines "
                        "serve (bit-exact, on the trainer's device) and send exactly what changed.")
    encoding: SparseEncoding = Field(default=SparseEncoding.flat_int32,
                                     description="Wire encoding; flat_int32 is vLLM's.")
    verify: bool = True
    all_or_nothing: bool = Field(default=False, description="If any engine fails, do not sync the others "
                                 "without it (default: the healthy engines commit, the failed ones are quarantined).")

    @field_validator("encoding", mode="before")
    @classmethod
    def _deprecated_encoding(cls, v: Any) -> Any:
        return DEPRECATED_ENCODINGS.get(v, v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_source(self) -> SyncSparse:
        if sum([self.patch_id is not None, bool(self.patches), self.delta]) != 1:
            raise ValueError("give exactly one of patch_id, patches or delta=true")
        return self

    model_config = {"json_schema_extra": {"examples": [{"engine_ids": ["e-1a2b3c"], "patch_id": "p-9f8e7d"},
                                                     {"engine_ids": ["e-1a2b3c"], "delta": True, "encoding": "auto"}]}}


class EngineSyncReport(ResponseModel):
    engine_id: str
    recv_ms: float
    version: str | None = Field(description="The version the engine serves after the sync (null: unknown).")
    kind: str | None = Field(default=None, description="The engine's kind (reference, vllm).")
    transport: str | None = Field(default=None, description="The transport the sync used for this engine "
                                  "(gloo, nccl, vllm_native, cuda_ipc, external).")
    fingerprint_equal: bool | None = None
    outcome: str = Field(default="committed", description="committed | failed (with cause).")
    cause: str | None = Field(default=None, description="Why it failed: the phase and the cause.")


class SyncReport(ResponseModel):
    mode: str
    engine_ids: list[str]
    payload_bytes: int = Field(description="Bytes of tensor data the sync carries (dense: all params).")
    wire_bytes: int = Field(description="Bytes actually broadcast.")
    send_ms: float = Field(description="Trainer-side send time, synchronized.")
    total_ms: float = Field(description="From job start to every engine serving the new weights.")
    tensors: int
    version: str
    patch_id: str | None = None
    encoding: str | None = None
    verified: bool | None = None
    diff_ms: float | None = None
    diff_gbps: float | None = None
    changed_fraction: float | None = Field(default=None, description="Changed elements / all elements (sparse).")
    messages: int | None = Field(default=None, description="Broadcasts the trainer made.")
    zero_copy: int | None = Field(default=None, description="Of those, sent straight from parameter storage (dense).")
    engines: list[EngineSyncReport] = Field(default_factory=list)
    transport: str | None = Field(default=None, description="The wire the bytes took (gloo, nccl, vllm_native, ...).")
    trainer: str | None = Field(default=None, description="An external trainer's slot name (None: the trainer actor).")
    requested: str | None = Field(default=None, description="External publish: dense | sparse | auto as asked.")
    fallback: str | None = Field(default=None, description="Why a sparse/auto publish went dense.")
    publisher_ms: float | None = Field(default=None, description="External publish: the publisher's own send time.")
