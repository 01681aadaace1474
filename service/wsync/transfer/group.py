"""Process groups built directly on a TCPStore (no init_process_group), so a process can open many."""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

# dtypes every backend broadcasts natively; anything else goes as a uint8 view (bit-exact).
_NATIVE = {
    torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
}


class Handle(Protocol):
    def wait(self) -> Any: ...


class _Done:
    """Handle for a no-op (empty tensor) broadcast."""

    def wait(self) -> bool:
        return True


def free_port(host: str = "") -> int:
    """A TCP port that was free a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def backend_for(device: torch.device | str | None) -> str:
    """"nccl" for CUDA devices, "gloo" otherwise."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


@dataclass
class Rendezvous:
    """Where rank 0 hosts the store, how many ranks join, and with which backend."""

    host: str
    port: int
    world_size: int
    backend: str = "gloo"
    name: str = "wsync"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rendezvous:
        return cls(**d)


class SyncGroup:
    """One process group: broadcast / barrier / close. Rank 0 is the trainer (the source)."""

    def __init__(self, pg: Any, store: Any, rank: int, world_size: int, backend: str,
                 device: torch.device) -> None:
        self._pg = pg
        self._store = store
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.device = device

    @property
    def closed(self) -> bool:
        return self._pg is None

    def _live_pg(self) -> Any:
        if self._pg is None:
            raise RuntimeError("SyncGroup is closed")
        return self._pg

    def broadcast_async(self, tensor: torch.Tensor, src: int = 0) -> Handle:
        """Start an in-place broadcast from `src`; call `.wait()` on the result."""
        pg = self._live_pg()
        if tensor.numel() == 0:
            return _Done()
        wire = tensor if tensor.dtype in _NATIVE else _uint8_view(tensor)
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        return pg.broadcast([wire], opts)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast `tensor` in place from `src` and wait; returns `tensor`."""
        self.broadcast_async(tensor, src).wait()
        return tensor

    def barrier(self) -> None:
        """All ranks meet (a 1-element all_reduce, device-synchronized on CUDA)."""
        pg = self._live_pg()
        t = torch.zeros(1, dtype=torch.int32, device=self.device)
        pg.allreduce([t], dist.AllreduceOptions()).wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self, abort: bool = False) -> None:
        """Release the process group and store; idempotent, does no collective. `abort=True` tears the
        communicator down without the graceful shutdown's wait (for a side that must not block on its
        peers, e.g. inside a vLLM worker; see WsyncWorkerExtension.wsync_close_sync_group)."""
        pg, self._pg = self._pg, None
        if pg is not None:
            for method in ("abort", "shutdown") if abort else ("shutdown", "abort"):
                fn = getattr(pg, method, None)
                if fn is None:
                    continue
                try:
                    fn()
                    break
                except Exception:  # noqa: BLE001 - best effort, the group is going away
                    continue
        store, self._store = self._store, None
        listener = store[-1] if isinstance(store, tuple) else None
        if isinstance(listener, socket.socket):
            listener.close()

    def __enter__(self) -> SyncGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SyncGroup(rank={self.rank}, world_size={self.world_size}, "
                f"backend={self.backend!r}, device={str(self.device)!r}, closed={self.closed})")


def _uint8_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"cannot broadcast non-contiguous {t.dtype} tensor")
    return t.detach().reshape(-1).view(torch.uint8)


def _resolve_device(backend: str, device: torch.device | str | int | None) -> torch.device:
    if device is None:
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"backend 'nccl' needs a CUDA device, got {dev}")
    return dev


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _make_pg(backend: str, store: Any, rank: int, world_size: int, timeout: timedelta, host: str = "") -> Any:
    if backend == "gloo":
        if is_loopback(host):  # gloo's pairs on loopback too (its default device binds the hostname's address)
            opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            return dist.ProcessGroupGloo(store, rank, world_size, opts)
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        if not hasattr(dist, "ProcessGroupNCCL"):
            raise RuntimeError("this torch build has no NCCL")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"unknown backend {backend!r} (use 'gloo' or 'nccl')")


def open_group(rdv: Rendezvous, rank: int, device: torch.device | str | int | None = None,
               timeout_s: float = 30.0) -> SyncGroup:
    """Join the group described by `rdv` as `rank`; every rank must call this concurrently. Every wait
    (rendezvous, communicator set-up, each collective) is bounded by ``timeout_s``. Rank 0's store
    listens on ``rdv.host`` only (a loopback rendezvous is reachable from this machine only)."""
    if not 0 <= rank < rdv.world_size:
        raise ValueError(f"rank {rank} outside world of {rdv.world_size}")
    dev = _resolve_device(rdv.backend, device)
    timeout = timedelta(seconds=timeout_s)
    listener = _listen(rdv.host, rdv.port) if rank == 0 else None
    try:
        extra: dict[str, Any] = {"master_listen_fd": listener.fileno()} if listener is not None else {}
        store = dist.TCPStore(rdv.host, rdv.port, rdv.world_size, is_master=(rank == 0), timeout=timeout,
                              wait_for_workers=False, **extra)
        prefixed = dist.PrefixStore(rdv.name, store)
        pg = _make_pg(rdv.backend, prefixed, rank, rdv.world_size, timeout, rdv.host)
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    # the store serves on the listener's descriptor: it lives (and closes) with the group
    return SyncGroup(pg, (store, prefixed, listener), rank, rdv.world_size, rdv.backend, dev)


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on exactly ``host:port`` (TCPStore alone binds every interface)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock
