from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field, model_validator

from .common import REFERENCE_PROMPTS, ResponseModel, UtcDatetime, WireModel
from .text import Text


class PatchKind(StrEnum):
    reference = "reference"
    random = "random"
    inline = "inline"
    delta = "delta"


class TensorPatch(WireModel):
    """One tensor's sparse change: flat (row-major) int32 indices and the new values."""

    name: str = Field(description="Parameter name, e.g. `model.embed_tokens.weight`.")
    indices: list[int] = Field(description="Flat element indices, 1-D, int32, unique, in range.")
    values: list[float] = Field(description="New values, finite, same length as indices.")
    dtype: str | None = Field(default=None, description="If given, must equal the parameter's dtype.")
    shape: list[int] | None = Field(default=None, description="If given, must equal the parameter's shape.")
    index_dtype: Literal["int32"] | str = Field(default="int32", description="Must be `int32` (vLLM's wire type).")


class PatchPrepare(WireModel):
    kind: PatchKind = PatchKind.reference
    prompts: list[Text] = Field(default_factory=lambda: list(REFERENCE_PROMPTS), min_length=1, max_length=256,
                                description="reference: rows come from these prompts' tokens.")
    rows: int = Field(default=32, ge=1, le=65536, description="reference: number of embedding rows to rotate.")
    param: str = Field(default="model.embed_tokens.weight", description="reference: the parameter to patch.")
    density: float | None = Field(default=None, gt=0.0, le=1.0, description="random: fraction of elements changed.")
    params: list[str] | None = Field(default=None, description="random: parameters to patch (default: all).")
    seed: int = Field(default=0, description="random: RNG seed.")
    patches: list[TensorPatch] | None = Field(default=None, description="inline: the tensors' changes.")

    @model_validator(mode="after")
    def _kind_fields(self) -> PatchPrepare:
        if self.kind == PatchKind.random and self.density is None:
            raise ValueError("density is required when kind is 'random'")
        if self.kind == PatchKind.inline and not self.patches:
            raise ValueError("patches is required (non-empty) when kind is 'inline'")
        if self.kind == PatchKind.delta:
            raise ValueError("delta patches are built by POST /v1/sync/sparse with delta=true")
        return self

    model_config = {
        "json_schema_extra": {
            "examples": [
                {"kind": "reference", "rows": 32},
                {"kind": "random", "density": 0.01, "seed": 7},
                {"kind": "inline", "patches": [{"name": "model.norm.weight", "indices": [0, 5], "values": [1.0, 0.5]}]},
            ]
        }
    }


class PatchTensorInfo(ResponseModel):
    name: str
    dtype: str
    shape: list[int]
    count: int


class PatchInfo(ResponseModel):
    id: str
    kind: PatchKind
    created_at: UtcDatetime
    base_version: str
    tensors: list[PatchTensorInfo]
    num_elements: int
    payload_bytes: int = Field(description="int32 indices + values, as vLLM's sparse wire carries them.")
    digest: str = Field(description="sha256 of indices bytes + float32 values bytes (the reference's digest).")
    selected_token_ids: list[int] | None = None
    target_version: str | None = Field(
        default=None, description="Version engines serve after applying it (default: the patch id).")
    diff_ms: float | None = Field(default=None,
                                     description="delta: time to diff the trainer against the synced snapshot.")
    diff_gbps: float | None = Field(default=None, description="delta: bytes compared (both sides) per second, GB/s.")
