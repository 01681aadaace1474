"""Transports: how bytes get from the trainer to one set of engines. One strategy object per engine,
chosen once when the engine becomes ready (``choose``), then driven by the sync run without branching
on what kind of engine or wire it is.

A transport owns the trainer's side only (open its group side, send); the engine's side is always
the same contract calls (engines/contract.py: join_group(rdv, rank, transport), prepare_sync,
recv_dense, recv_sparse). Names are the strings engines list in ``EngineDetails.transports``:

- ``gloo`` / ``nccl`` (WsyncWire): wsync.transfer's wire (bucketed dense, every sparse encoding,
  checkpoint names) over a wsync process group; gloo on CPU, NCCL on GPU.
- ``vllm_native`` (VLLMNative): vLLM's own weight-transfer API and wire; flat_int32 sparse only.
- ``cuda_ipc`` (CudaIpc): the engine sits on the trainer's physical GPU (same UUID; NCCL refuses two
  ranks on one GPU). Its "group" is one IPC session per engine (trainer: an IpcExporter over its flat
  buckets + an IpcStaging buffer; engine: the mapping), opened in ``rendezvous`` (the exports travel
  in the rendezvous as plain data), reused between syncs and torn down by TransferGroups like any
  group. A sync first readies the trainer (``dense_updates`` / ``sparse_updates``: re-export only on
  a layout change, write the sparse staging, one stream sync), then the engines copy.
- ``external`` (External): the trainer is a process outside the service (a publisher, the user's own
  training loop; wsync.sync.external). It hosts the rendezvous and sends the wsync wire itself; the
  transport's ``open``/``send_*`` talk to its handle (``ExternalHandle``: resolved by the publisher's
  ``done``) instead of the trainer actor. Chosen for a ``TrainerSide(kind="external")``.

A new transport is a new subclass plus one ``TRANSPORTS`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from wsync.actors.ref import ActorRef
from wsync.engines.contract import DenseUpdate, EngineDetails, SparseUpdate, normalize_gpu_uuid
from wsync.transfer.sparse import SparseMeta

CUDA_IPC = "cuda_ipc"


def same_gpu(a: str | None, b: str | None) -> bool:
    """Whether two reported GPU UUIDs name the same physical GPU ("GPU-" prefix or not)."""
    return bool(normalize_gpu_uuid(a)) and normalize_gpu_uuid(a) == normalize_gpu_uuid(b)


@dataclass(frozen=True)
class TrainerSide:
    """What a transport needs to know about the trainer to decide whether it can serve an engine."""

    device: str  # "cpu" or "cuda"
    gpu_uuid: str | None = None
    #: "actor": the service's trainer actor; otherwise a TRANSPORTS key naming the trainer's own family
    #: of transports (e.g. "external": a publisher outside the service)
    kind: str = "actor"


class Transport:
    """The trainer's side of one wire. Every method returns a pending actor call (``Actors.wait``)."""

    name: ClassVar[str] = ""

    def __init__(self, name: str | None = None):
        self.name = name or type(self).name  # type: ignore[misc]

    @classmethod
    def usable(cls, name: str, trainer: TrainerSide, engine: EngineDetails) -> bool:
        """Whether this trainer can send to this engine over ``name``."""
        raise NotImplementedError

    @property
    def backend(self) -> str | None:
        """The process-group backend the rendezvous names (None: the transport's own)."""
        return None

    def rendezvous(self, caller: Any, trainer: ActorRef, name: str, engine_uuids: list[str | None],
                   host: str | None = None) -> dict:
        """What every side of a new group named ``name`` is told (engines in rank order 1..n); the
        trainer's store listens on ``host`` (Settings.rendezvous_host; None: the Ray node's address)."""
        return caller.wait([trainer.call("rendezvous", 1 + len(engine_uuids), name, self.backend, host)])[0]

    def open(self, trainer: ActorRef, rendezvous: dict, timeout_s: float) -> Any:
        """Open the trainer's side of a group (rank 0), concurrently with the engines' join_group."""
        raise NotImplementedError

    def dense_updates(self, caller: Any, trainer: ActorRef, group: str, update: DenseUpdate,
                      n: int) -> list[DenseUpdate]:
        """What each of the group's ``n`` engines receives (rank order), readied on the trainer first
        when the transport needs it; by default the same update for all."""
        return [update] * n

    def sparse_updates(self, caller: Any, trainer: ActorRef, group: str, patch_id: str, metas: list[SparseMeta],
                       n: int) -> list[SparseUpdate]:
        """As ``dense_updates``, for a sparse sync of a held patch planned by ``metas``."""
        return [SparseUpdate(metas=metas)] * n

    def sparse_encoding(self, requested: str) -> str:
        """The wire encoding this transport sends for a requested one."""
        return requested

    def send_dense(self, trainer: ActorRef, group: str, update: DenseUpdate) -> Any:
        """Send every parameter; the pending call yields TransferStats."""
        raise NotImplementedError

    def send_sparse(self, trainer: ActorRef, group: str, patch_id: str, metas: list[SparseMeta]) -> Any:
        """Send a held patch as planned by ``metas``; the pending call yields TransferStats."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class WsyncWire(Transport):
    """wsync.transfer over a wsync process group: "gloo" (CPU) or "nccl" (GPU)."""

    name = "gloo"

    @classmethod
    def usable(cls, name: str, trainer: TrainerSide, engine: EngineDetails) -> bool:
        return name == ("nccl" if trainer.device == "cuda" else "gloo")

    @property
    def backend(self) -> str | None:
        return self.name

    def open(self, trainer: ActorRef, rendezvous: dict, timeout_s: float) -> Any:
        return trainer.call("open_group", rendezvous, timeout_s)

    def send_dense(self, trainer: ActorRef, group: str, update: DenseUpdate) -> Any:
        return trainer.call("send_dense", group, update.bucket_bytes)

    def send_sparse(self, trainer: ActorRef, group: str, patch_id: str, metas: list[SparseMeta]) -> Any:
        return trainer.call("send_sparse", group, patch_id, metas)


class VLLMNative(Transport):
    """vLLM's own weight-transfer API (its trainer-side helpers and wire): NCCL, flat_int32 sparse."""

    name = "vllm_native"

    @classmethod
    def usable(cls, name: str, trainer: TrainerSide, engine: EngineDetails) -> bool:
        return trainer.device == "cuda"

    @property
    def backend(self) -> str | None:
        return "nccl"

    def open(self, trainer: ActorRef, rendezvous: dict, timeout_s: float) -> Any:
        return trainer.call("open_vllm_group", rendezvous, timeout_s)

    def sparse_encoding(self, requested: str) -> str:
        return "flat_int32"  # vLLM's wire order

    def send_dense(self, trainer: ActorRef, group: str, update: DenseUpdate) -> Any:
        return trainer.call("send_dense_vllm", group, update.packed)

    def send_sparse(self, trainer: ActorRef, group: str, patch_id: str, metas: list[SparseMeta]) -> Any:
        return trainer.call("send_sparse_vllm", group, patch_id)


class CudaIpc(Transport):
    """CUDA IPC to engines on the trainer's own GPU (wsync.transfer.ipc / ipc_sparse): the trainer's
    flat buckets are exported once per session and mapped by the engine; each dense sync is device
    copies on the engine, each sparse sync one staging write on the trainer + decode/scatter on the
    engine. The trainer side is TrainerCore's ipc_* methods (actors/trainer_ipc.py)."""

    name = CUDA_IPC

    @classmethod
    def usable(cls, name: str, trainer: TrainerSide, engine: EngineDetails) -> bool:
        return trainer.device == "cuda" and same_gpu(trainer.gpu_uuid, engine.gpu_uuid)

    def rendezvous(self, caller: Any, trainer: ActorRef, name: str, engine_uuids: list[str | None],
                   host: str | None = None) -> dict:
        exports = caller.wait([trainer.call("ipc_open", name, i + 1, u) for i, u in enumerate(engine_uuids)])
        return {"name": name, "world_size": 1 + len(engine_uuids), "backend": None,
                "exports": {str(i + 1): e for i, e in enumerate(exports)}}

    def open(self, trainer: ActorRef, rendezvous: dict, timeout_s: float) -> Any:
        return trainer.call("ipc_sessions", rendezvous["name"], rendezvous["world_size"] - 1)

    def dense_updates(self, caller: Any, trainer: ActorRef, group: str, update: DenseUpdate,
                      n: int) -> list[DenseUpdate]:
        ready = caller.wait([trainer.call("ipc_dense_ready", group)])[0]
        return [replace(update, ipc=ready[i + 1]) for i in range(n)]

    def sparse_updates(self, caller: Any, trainer: ActorRef, group: str, patch_id: str, metas: list[SparseMeta],
                       n: int) -> list[SparseUpdate]:
        ready = caller.wait([trainer.call("ipc_sparse_write", group, patch_id, metas)])[0]
        return [SparseUpdate(metas=metas, ipc=ready[i + 1]) for i in range(n)]

    def send_dense(self, trainer: ActorRef, group: str, update: DenseUpdate) -> Any:
        return trainer.call("ipc_sent", group)  # the trainer's work was done in dense_updates

    def send_sparse(self, trainer: ActorRef, group: str, patch_id: str, metas: list[SparseMeta]) -> Any:
        return trainer.call("ipc_sent", group)


class External(WsyncWire):
    """The wsync wire from a trainer outside the service (a publisher; wsync.sync.external): it hosts
    the group's rendezvous as rank 0 and sends by itself. ``trainer`` is its ``ExternalHandle``:
    ``open`` resolves at once (the publisher opens its own side), ``send_*`` resolve with the stats the
    publisher reports in ``done`` (or fail with its error). The name is the wire's ("gloo"/"nccl")."""

    @classmethod
    def usable(cls, name: str, trainer: TrainerSide, engine: EngineDetails) -> bool:
        return trainer.kind == "external" and name == ("nccl" if trainer.device.startswith("cuda") else "gloo")


#: name -> class. A trainer side whose ``kind`` is not "actor" picks from the entry of that kind
#: ("external": a publisher outside the service).
TRANSPORTS: dict[str, type[Transport]] = {
    "gloo": WsyncWire,
    "nccl": WsyncWire,
    "vllm_native": VLLMNative,
    "external": External,
    CUDA_IPC: CudaIpc,
}


class NoTransport(RuntimeError):
    """The engine lists no transport this trainer can send on."""


def choose(engine: EngineDetails, trainer: TrainerSide) -> Transport:
    """The first of the engine's transports (its order of preference) this trainer can use."""
    family = None if trainer.kind == "actor" else TRANSPORTS.get(trainer.kind)
    for name in engine.transports:
        cls = family or TRANSPORTS.get(name)
        if cls is not None and cls.usable(name, trainer, engine):
            return cls(name)
    sends = [n for n, c in TRANSPORTS.items() if family is None and c.usable(n, trainer, engine)]
    if family is not None:
        sends = [n for n in ("gloo", "nccl") if family.usable(n, trainer, engine)]
    raise NoTransport(f"no transport in common: the engine receives on {engine.transports or 'nothing'}, "
                      f"the trainer ({trainer.device}, GPU {trainer.gpu_uuid or '-'}; engine GPU "
                      f"{engine.gpu_uuid or '-'}) sends on {sends or 'nothing'}")
