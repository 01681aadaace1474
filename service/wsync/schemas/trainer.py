from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import REFERENCE_PROMPTS, ResponseModel, WireModel
from .text import Text


class TrainerLoad(WireModel):
    model: str | None = Field(default=None, description="Local HF folder or hub id; default: the embedded model.")
    dtype: str = Field(default="bfloat16", pattern="^(bfloat16|float16|float32)$")
    wait: bool = Field(default=True, description="Answer 200 with the trainer once loaded, if that happens within "
                       "the server's wait bound; else (or with wait=false) 202 with the load job.")

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
    gpu_uuid: str | None = None
    params: list[ParamSpec] | None = None


class TrainerStep(WireModel):
    """A real optimizer step on the trainer (causal-LM loss on the texts), e.g. to produce a real delta."""

    texts: list[Text] = Field(default_factory=lambda: list(REFERENCE_PROMPTS), min_length=1, max_length=256)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    steps: int = Field(default=1, ge=1, le=100)

    model_config = {"json_schema_extra": {"examples": [{}, {"optimizer": "sgd", "lr": 0.01, "steps": 2}]}}


class TrainerStepResult(ResponseModel):
    version: str
    losses: list[float | None] = Field(description="Loss per step; null where it was not finite (NaN/inf).")
    step_ms: float
