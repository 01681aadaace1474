"""Ray actor wrappers: the cores (TrainerCore, engine cores) as ``ray.remote`` actors, behind the
``Actors`` / ``ActorRef`` surface of actors/ref.py. Only this module and the registry's start touch Ray."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from wsync.settings import Settings

from .ref import CONTROL_METHODS, ActorGone, CallTimeout, RemoteError

#: a second lane of threads on every actor for CONTROL_METHODS (teardown), so a call stuck in the default
#: lane (an open or a collective waiting on a dead peer) never blocks the abort that frees it
CONCURRENCY_GROUPS = {"control": 2}


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
        fn = getattr(self.handle, method)
        if method in CONTROL_METHODS:
            fn = fn.options(concurrency_group="control")
        return fn.remote(*args, **kwargs)

    def probe(self, method: str) -> Any:
        """``method`` (a cheap read: ready / info) on the control lane: answers even while a call is stuck."""
        return getattr(self.handle, method).options(concurrency_group="control").remote()

    def gone(self) -> str | None:
        """Why the actor is dead (from Ray's control store, without calling it), or None while alive."""
        try:
            info = ray._private.state.actors(actor_id=self.handle._actor_id.hex())
        except Exception:  # noqa: BLE001 - unknown: treat as alive, the calls' timeouts still bound it
            return None
        if not info or info.get("State") != "DEAD":
            return None
        cause = info.get("DeathCause")
        text = str(cause) if cause else "the actor is dead"
        for line in text.splitlines():
            if "error_message" in line:
                return line.split(":", 1)[1].strip().strip('"')[:300]
        return text[:300]

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
            else:  # a cluster of our own binds the configured address (loopback by default)
                kwargs["_node_ip_address"] = self.settings.ray_node_ip
                if self.settings.ray_num_cpus is not None:
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

        cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(TrainerCore)
        return RayRef(cls.options(**actor_options(device)).remote(_core_device(device), max_snapshots, bucket_bytes))

    def create_engine(self, kind: str, model: str, device: str, options: dict) -> RayRef:
        cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(_engine_core(kind))
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
