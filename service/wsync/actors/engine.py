"""Ray actor wrappers: the cores (TrainerCore, engine cores) as ``ray.remote`` actors, behind the
``Actors`` / ``ActorRef`` surface of actors/ref.py. Only this module and the registry's start touch Ray."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from wsync.settings import Settings

from .ref import ActorGone, CallTimeout, RemoteError


def actor_options(device: str, name: str | None = None) -> dict:
    """One GPU per actor on a GPU cluster; on CPU no CPU reservation so a 2-core box holds a fleet."""
    opts: dict = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": 0}
    opts["max_concurrency"] = 1
    if name:
        opts["name"] = name
    return opts


def _engine_core(kind: str):
    """The engine core class for ``kind`` (imported lazily: vLLM only where asked for)."""
    if kind == "vllm":
        from wsync.engines.vllm.engine import VLLMEngineCore

        return VLLMEngineCore
    from wsync.engines.reference import ReferenceEngineCore

    return ReferenceEngineCore


class RayRef:
    """One Ray actor."""

    def __init__(self, handle: Any):
        self.handle = handle

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.handle, method).remote(*args, **kwargs)

    def kill(self) -> None:
        try:
            ray.kill(self.handle)
        except Exception:  # noqa: BLE001 - already gone
            pass


class RayActors:
    """Starts (or joins) Ray, creates actors, gathers ObjectRefs."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = "cpu"
        self._started_ray = False

    def start(self) -> None:
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if self.settings.ray_address:
                kwargs["address"] = self.settings.ray_address
            elif self.settings.ray_num_cpus is not None:
                kwargs["num_cpus"] = self.settings.ray_num_cpus
            ray.init(**kwargs)
            self._started_ray = True
        if self.settings.device == "auto":
            self.device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        else:
            self.device = self.settings.device

    def stop(self) -> None:
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def alive(self) -> bool:
        return ray.is_initialized()

    def create_trainer(self, device: str, max_snapshots: int, bucket_bytes: int | None) -> RayRef:
        from wsync.actors.trainer import TrainerCore

        cls = ray.remote(TrainerCore)
        return RayRef(cls.options(**actor_options(device)).remote(_core_device(device), max_snapshots, bucket_bytes))

    def create_engine(self, kind: str, model: str, device: str, options: dict) -> RayRef:
        cls = ray.remote(_engine_core(kind))
        return RayRef(cls.options(**actor_options(device)).remote(model, _core_device(device), options))

    def wait(self, pending: Sequence[Any], timeout: float) -> list[Any]:
        try:
            return ray.get(list(pending), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise CallTimeout("the call timed out") from None
        except ray.exceptions.RayActorError as exc:
            raise ActorGone(f"the actor is gone ({exc})") from exc
        except ray.exceptions.RayTaskError as exc:
            raise RemoteError(str(exc)) from exc


def _core_device(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"
