from __future__ import annotations

from pydantic import Field

from .common import ResponseModel, WireModel


class TrainerLoad(WireModel):
    model: str | None = Field(default=None, description="Local HF folder or hub id; default: the embedded model.")
    dtype: str = Field(default="bfloat16", pattern="^(bfloat16|float16|float32)$")

    model_config = {"json_schema_extra": {"examples": [{}, {"model": "/models/Qwen2.5-0.5B-Instruct"}]}}


class ParamSpec(ResponseModel):
    name: str
    dtype: str
    shape: list[int]


class TrainerInfo(ResponseModel):
    loaded: bool
    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    version: str | None = None
    num_params: int = 0
    param_bytes: int = 0
    num_tensors: int = 0
    params: list[ParamSpec] | None = None
