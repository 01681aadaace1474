"""Where actors run on a GPU cluster, and whether a new one can fit: pure functions (CPU-testable).

Whole GPUs when the cluster has enough (the trainer one, every engine one: NCCL between them). On a
cluster with fewer GPUs than the trainer plus one engine (one GPU: the common RL box), the trainer and
the engines share a GPU: Ray gets fractional ``num_gpus`` (the trainer ``trainer_fraction``, each
engine ``engine_fraction``; Ray only counts them, memory is each process's own business) and they
sync over CUDA IPC (wsync.sync.transports.CudaIpc). ``Settings.colocate``: "auto" (colocate when the
cluster has fewer than 2 GPUs), "on", "off".

Two refusals instead of a hang (a Ray actor asking for more GPU than the cluster has waits forever):
``check_capacity`` (GPU count: what the new actor needs vs what is free, and who holds the rest) and
``memory_budget`` (a colocated vLLM engine's gpu_memory_utilization vs the GPU's free memory, keeping
room for what the trainer will still allocate: optimizer state, snapshots)."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30

#: bytes of optimizer state + gradients per byte of weights a colocated trainer may still allocate
#: (AdamW: two moments + the gradient, in the weights' dtype)
OPTIMIZER_FACTOR = 3.0
#: activations and allocator slack a colocated trainer keeps free
TRAINER_HEADROOM_BYTES = 2 * GIB


class PlacementError(RuntimeError):
    """The actor cannot be placed (the message names what it needs and what the cluster has)."""


@dataclass(frozen=True)
class Placement:
    """How the service places actors, decided once at start from the cluster."""

    device: str  # "cpu" | "cuda"
    cluster_gpus: float = 0.0
    colocated: bool = False
    trainer_fraction: float = 1.0
    engine_fraction: float = 1.0

    def gpus_for(self, role: str) -> float:
        """Ray ``num_gpus`` for a "trainer" or an "engine" (0 on CPU)."""
        if self.device != "cuda":
            return 0.0
        if not self.colocated:
            return 1.0
        return self.trainer_fraction if role == "trainer" else self.engine_fraction

    def describe(self) -> str:
        if self.device != "cuda":
            return "cpu"
        if not self.colocated:
            return f"{self.cluster_gpus:g} GPU(s), one per actor"
        return (f"{self.cluster_gpus:g} GPU(s), colocated: trainer {self.trainer_fraction:g} GPU, "
                f"each engine {self.engine_fraction:g} GPU")


def plan_placement(device: str, cluster_gpus: float, colocate: str = "auto", trainer_fraction: float = 0.25,
                   engine_fraction: float = 0.25) -> Placement:
    """The placement for a cluster with ``cluster_gpus`` GPUs (``device`` "cuda"/"cpu")."""
    if colocate not in ("auto", "on", "off"):
        raise ValueError(f"colocate must be auto, on or off, not {colocate!r}")
    if device != "cuda":
        return Placement("cpu", cluster_gpus)
    on = colocate == "on" or (colocate == "auto" and cluster_gpus < 2)
    if not on:
        return Placement("cuda", cluster_gpus)
    if not (0 < trainer_fraction < 1 and 0 < engine_fraction < 1):
        raise ValueError("colocated GPU fractions must lie strictly between 0 and 1")
    return Placement("cuda", cluster_gpus, True, trainer_fraction, engine_fraction)


def actor_options(placement: Placement, role: str, name: str | None = None) -> dict:
    """Ray actor options: GPU share per the placement, one CPU on a GPU cluster, none on CPU (a
    2-core box holds a fleet); one call at a time."""
    gpus = placement.gpus_for(role)
    opts: dict = {"num_gpus": gpus, "num_cpus": 1} if placement.device == "cuda" else {"num_cpus": 0}
    opts["max_concurrency"] = 1
    if name:
        opts["name"] = name
    return opts


def check_capacity(placement: Placement, role: str, free_gpus: float, holders: str = "") -> None:
    """Raise PlacementError when a new ``role`` actor needs more GPU than is free (instead of a Ray
    actor that waits forever for it)."""
    want = placement.gpus_for(role)
    if want <= 0 or free_gpus + 1e-9 >= want:
        return
    hint = ("set WSYNC_COLOCATE=auto (or on) to share the GPU" if not placement.colocated else
            "delete an engine, or lower WSYNC_ENGINE_GPU_FRACTION / WSYNC_TRAINER_GPU_FRACTION")
    raise PlacementError(f"a new {role} needs {want:g} GPU; the cluster has {placement.cluster_gpus:g} GPU(s), "
                         f"{max(free_gpus, 0.0):g} free{f' ({holders})' if holders else ''} "
                         f"[placement: {placement.describe()}]: {hint}")


def trainer_reserve(param_bytes: int, snapshots: int, optimizer_factor: float = OPTIMIZER_FACTOR,
                    headroom: int = TRAINER_HEADROOM_BYTES) -> int:
    """Bytes a colocated trainer may hold at its peak: weights, snapshot copies, optimizer + grads."""
    return int(param_bytes * (1 + max(0, snapshots) + optimizer_factor)) + headroom


def memory_budget(utilization: float, free_bytes: int, total_bytes: int, trainer_param_bytes: int = 0,
                  trainer_allocated: int = 0, snapshots: int = 1) -> str | None:
    """Why a colocated vLLM engine with ``gpu_memory_utilization`` cannot start (None: it fits).

    vLLM takes ``utilization * total`` at start and refuses when less is free; the trainer must keep
    room for what it will still allocate (``trainer_reserve`` minus what it already holds)."""
    need = int(utilization * total_bytes)
    grow = max(0, trainer_reserve(trainer_param_bytes, snapshots) - trainer_allocated) if trainer_param_bytes else 0
    if need + grow <= free_bytes:
        return None
    fit = max(0.0, (free_bytes - grow) / total_bytes) if total_bytes else 0.0
    return (f"gpu_memory_utilization {utilization:g} needs {need / GIB:.1f} GiB of the GPU's {total_bytes / GIB:.1f} "
            f"GiB, plus {grow / GIB:.1f} GiB the colocated trainer may still allocate (weights "
            f"{trainer_param_bytes / GIB:.2f} GiB x (1 + {snapshots} snapshot(s) + optimizer {OPTIMIZER_FACTOR:g}) "
            f"+ {TRAINER_HEADROOM_BYTES / GIB:.0f} GiB headroom, {trainer_allocated / GIB:.1f} GiB held now); "
            f"{free_bytes / GIB:.1f} GiB is free: use gpu_memory_utilization <= {int(fit * 100) / 100:g}")
