"""Ray actor wrappers: the cores (TrainerCore, engine cores) as ``ray.remote`` actors, behind the
``Actors`` / ``ActorRef`` surface of actors/ref.py. Only this module and the registry's start touch Ray."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import ray

from wsync.settings import Settings

from .placement import Placement, PlacementError, check_capacity, plan_placement
from .placement import actor_options as _actor_options
from .ref import CONTROL_METHODS, ActorGone, CallTimeout, RemoteError

#: a second lane of threads on every actor for CONTROL_METHODS (teardown), so a call stuck in the default
#: lane (an open or a collective waiting on a dead peer) never blocks the abort that frees it
CONCURRENCY_GROUPS = {"control": 2}

#: how long a new actor waits for GPU share that actors being deleted still hold before it is refused
PLACEMENT_WAIT_S = 20.0


def actor_options(device: str, name: str | None = None, role: str = "engine",
                  placement: Placement | None = None) -> dict:
    """Ray options for a ``role`` actor (actors/placement.py): whole GPUs, or fractions when colocated."""
    return _actor_options(placement or plan_placement(device, 2.0 if device == "cuda" else 0.0, "off"), role, name)


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

    def wait_gone(self, timeout_s: float = 30.0) -> bool:
        """After ``kill``: wait (at most ``timeout_s``) until Ray reports the actor dead, i.e. its process
        and the GPU memory it held are gone (a colocated engine starting next must not profile GPU
        memory while a dead one is still releasing it). True when gone."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.handle.__ray_ready__.remote(), timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            except ray.exceptions.RayActorError:
                return True
            except Exception:  # noqa: BLE001 - a timeout or a transient error: ask again
                pass
            time.sleep(0.2)
        return False


class RayActors:
    """Starts (or joins) Ray, creates actors, gathers ObjectRefs."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = "cpu"
        self.placement = Placement("cpu")
        self._started_ray = False

    @property
    def colocated(self) -> bool:
        """Whether the trainer and the engines share GPUs (actors/placement.py)."""
        return self.placement.colocated

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
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if self.settings.device == "auto":
            self.device = "cuda" if gpus > 0 else "cpu"
        else:
            self.device = self.settings.device
        self.placement = plan_placement(self.device, gpus, self.settings.colocate, self.settings.trainer_gpu_fraction,
                                        self.settings.engine_gpu_fraction)
        if self.device == "cuda" and gpus <= 0:
            self.placement = Placement("cuda", 0.0)  # check_capacity then refuses at once, naming the cause

    def stop(self) -> None:
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def alive(self) -> bool:
        return ray.is_initialized()

    def create_trainer(self, device: str, max_snapshots: int, bucket_bytes: int | None) -> RayRef:
        from wsync.actors.trainer import TrainerCore

        self._await_capacity("trainer")
        cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(TrainerCore)
        opts = _actor_options(self.placement, "trainer")
        return RayRef(cls.options(**opts).remote(_core_device(device), max_snapshots, bucket_bytes))

    def create_engine(self, kind: str, model: str, device: str, options: dict) -> RayRef:
        """Raises PlacementError at once (after waiting PLACEMENT_WAIT_S for share that deleted actors
        still hold) when the engine's GPU share is not free: a Ray actor would wait forever for it."""
        self._await_capacity("engine")
        cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(_engine_core(kind))
        opts = _actor_options(self.placement, "engine")
        return RayRef(cls.options(**opts).remote(model, _core_device(device), {**options,
                                                                                "colocated": self.colocated}))

    def _await_capacity(self, role: str) -> None:
        if self.placement.gpus_for(role) <= 0:
            return
        deadline = time.monotonic() + PLACEMENT_WAIT_S
        while True:
            free = float(ray.available_resources().get("GPU", 0.0))
            try:
                check_capacity(self.placement, role, free)
                return
            except PlacementError:
                if time.monotonic() >= deadline:
                    check_capacity(self.placement, role, free, _holders())  # raises, naming who holds it
                    raise
            time.sleep(0.5)

    def wait(self, pending: Sequence[Any], timeout: float) -> list[Any]:
        try:
            return ray.get(list(pending), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise CallTimeout("the call timed out") from None
        except ray.exceptions.RayActorError as exc:
            raise ActorGone(f"the actor is gone ({exc})") from exc
        except ray.exceptions.RayTaskError as exc:
            raise RemoteError(str(exc)) from exc


def _holders() -> str:
    """Which live actors hold GPU share (for a refusal's message); best effort."""
    try:
        from ray.util.state import list_actors

        live = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=100, timeout=5,
                                        raise_on_missing_output=False)
                if (a.get("required_resources") or {}).get("GPU")]
        return ", ".join(f"{a.get('class_name')} {a['required_resources']['GPU']:g} GPU" for a in live)
    except Exception:  # noqa: BLE001 - the state API is optional here
        return ""


def _core_device(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"
