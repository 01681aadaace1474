"""Wire models of the external-trainer (publisher) routes and of sampled rollouts.

A publisher is the user's own training process: it registers its tensors under a trainer slot
(``/v1/trainers``), hosts the rendezvous of each publish as rank 0, sends the bytes itself and reports
how it went (``done``); the service coordinates the engines and records the sync. See docs/PUBLISHER.md."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from .common import ResponseModel, WireModel

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
_DTYPE = r"^(float32|float16|bfloat16|float64|int64|int32|int16|int8|uint8|bool|float8_e4m3fn|float8_e5m2)$"


class ParamMeta(WireModel):
    name: str = Field(min_length=1, max_length=512, description="Checkpoint name of the tensor.")
    dtype: str = Field(pattern=_DTYPE)
    shape: list[int] = Field(max_length=16)


class SparseTensorMeta(ParamMeta):
    count: int = Field(ge=0, description="Changed elements.")
    encoding: str = Field(min_length=1, max_length=32)
    nbytes: int = Field(ge=0)


class RendezvousSpec(WireModel):
    """Where the publisher (rank 0) hosts the group's TCPStore; the engines join as ranks 1..N."""

    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)
    world_size: int = Field(ge=2, le=1025)
    backend: Literal["gloo", "nccl"] = "gloo"
    name: str = Field(default="wsync", pattern=_NAME)


class TrainerRegister(WireModel):
    name: str = Field(default="default", pattern=_NAME, description="The trainer slot; one live publisher each.")
    host: str = Field(default="127.0.0.1", min_length=1, max_length=255, description="Where engines dial it.")
    device: str = Field(default="cpu", max_length=32, description="Where its weights live (cpu, cuda, cuda:0).")
    gpu_uuid: str | None = Field(default=None, max_length=64)
    params: list[ParamMeta] = Field(min_length=1, description="Every tensor it publishes, in the dense wire's order.")


class TrainerSlot(ResponseModel):
    id: str
    name: str
    host: str
    device: str
    num_tensors: int
    num_params: int
    checked_models: list[str] = Field(default_factory=list,
                                      description="Engine models whose checkpoint layout the tensors matched.")
    lease_s: float = Field(description="Seconds without a heartbeat, publish or done before the slot frees.")
    lease_expires_at: datetime
    version: str | None = Field(default=None, description="The last version this publisher published.")
    created_at: datetime


class PublishRequest(WireModel):
    mode: Literal["dense", "sparse"] = Field(description="What goes on the wire.")
    requested: Literal["dense", "sparse", "auto"] = "dense"
    engine_ids: list[str] = Field(min_length=1, description="Receivers, in rank order (rank i+1 = engine_ids[i]).")
    version: str = Field(min_length=1, max_length=128, description="What the engines serve once verified.")
    base_version: str | None = Field(default=None, max_length=128, description="Sparse: the version it patches.")
    fallback: str | None = Field(default=None, max_length=1000, description="Why a sparse/auto request went dense.")
    rendezvous: RendezvousSpec
    bucket_bytes: int = Field(default=64 << 20, ge=1024)
    sparse_metas: list[SparseTensorMeta] | None = None


class PublishAccepted(ResponseModel):
    id: str = Field(description="The publish job's id (GET /v1/jobs/{id}).")
    plan: dict[str, Literal["dense", "sparse"]] = Field(description="What each engine receives.")
    mode: Literal["dense", "sparse"] = Field(description="What the publisher must send (one stream to all).")
    fallback: str | None = Field(default=None, description="Why the service made a sparse publish dense.")


class PublishDone(WireModel):
    """The publisher's report after its send (``PublishReport.to_dict`` + total_ms), or ``error``."""

    error: str | None = Field(default=None, max_length=4000)
    version: str | None = None
    mode: str | None = None
    requested: str | None = None
    base_version: str | None = None
    fallback: str | None = None
    stats: dict[str, Any] = Field(default_factory=dict)
    fingerprints: dict[str, str] = Field(default_factory=dict)
    tensors: int = 0
    elements: int = 0
    total_ms: float | None = None


class SampleRequest(WireModel):
    prompts: list[str] = Field(min_length=1, max_length=256)
    n: int = Field(default=1, ge=1, le=256, description="Completions per prompt.")
    max_new_tokens: int = Field(default=16, ge=1, le=1024, description="Exactly this many tokens each.")
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_k: int = Field(default=0, ge=0, description="0: the full distribution.")
    seed: int = Field(default=0, ge=0)


class SampleResponse(ResponseModel):
    engine_id: str
    version: str | None = Field(description="The weight version that produced these samples (None: unknown).")
    samples: list[dict[str, Any]] = Field(description="Per prompt: prompt_ids, token_ids [n][T], logprobs [n][T], "
                                                      "texts.")
