"""Ray actor wrappers. The cores are plain classes, testable without Ray."""

from __future__ import annotations

import ray


def actor_options(device: str, name: str | None = None) -> dict:
    """One GPU per actor on a GPU cluster; on CPU no CPU reservation so a 2-core box holds a fleet."""
    opts: dict = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": 0}
    opts["max_concurrency"] = 1
    if name:
        opts["name"] = name
    return opts


def create_trainer(device: str, max_snapshots: int = 1, bucket_bytes: int | None = None):
    from wsync.actors.trainer import TrainerCore

    cls = ray.remote(TrainerCore)
    return cls.options(**actor_options(device)).remote("cuda" if device == "cuda" else "cpu", max_snapshots,
                                                   bucket_bytes)


def create_engine(kind: str, model: str, device: str, options: dict):
    if kind == "vllm":
        from wsync.engines.vllm.engine import VLLMEngineCore as core
    else:
        from wsync.engines.reference import ReferenceEngineCore as core
    cls = ray.remote(core)
    return cls.options(**actor_options(device)).remote(model, "cuda" if device == "cuda" else "cpu", options)
