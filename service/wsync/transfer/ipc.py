"""CUDA IPC between a trainer and an engine on the SAME physical GPU (NCCL refuses two ranks on one GPU).

Dense: the trainer's parameters already live in flat buffers (`flat.flatten_params`). Every CUDA storage
that holds parameters is one buffer, exported once as one handle (`IpcExporter.export`); the engine opens
each buffer once (`IpcMapping`) and, per sync, runs a planned list of device copies from the mapped
buffers into its own tensors (`CopyPlan`): no staging copy on the trainer, no handle opened per sync.
Sparse: `ipc_sparse` (one shared staging buffer the trainer writes the encoded stream into).

Plain data only: an `IpcExport` is strings, ints, bools and bytes (`to_dict(binary="base64")` for JSON);
no pickle, no torch object. Byte layout of a buffer: `LayoutEntry(name, bucket, offset, numel, dtype,
shape)` = bytes [offset, offset + numel * itemsize) of buffer `bucket` hold the tensor's contiguous
row-major bytes. `digest` hashes the layout and buffer sizes; `export_id` also hashes the handles, so a
trainer that re-allocated its buffers (same layout, new memory) gets a new export_id. Every sync names the
export_id it was prepared against, and the engine refuses a mismatch (`IpcStaleLayoutError`): it never
copies from stale offsets or freed memory; the caller re-sends the export (`IpcMapping.ensure`) and retries.

Ordering: the trainer calls `IpcExporter.mark_ready()` (one stream sync, or an event record with
`use_event=True`) before it tells the engine to copy; the engine's copies run on its current stream and
end with one stream synchronize. Host syncs per dense sync: trainer 1 (0 with the event), engine 1.
Lifetime: the trainer keeps the buffers alive while exported; `IpcMapping.close()` drops the engine's
mapping (torch closes the IPC handles and releases its reference counts) and the trainer's
`IpcExporter.close()` + `torch.cuda.ipc_collect()` then frees memory the trainer already dropped.
Needs PyTorch's default CUDA allocator (expandable segments off); `check_allocator()` says so clearly.
One export, one consumer: torch counts each `_share_cuda_` once and each consumer's close decrements it,
so an export mapped by two engines could free memory one of them still maps; give each engine its own
`IpcExporter` (an export that is never opened keeps a buffer the trainer frees in limbo until exit).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .meta import dtype_name, torch_dtype

__all__ = [
    "BufferHandle",
    "CopyPlan",
    "IpcDeviceError",
    "IpcError",
    "IpcExport",
    "IpcExporter",
    "IpcMapping",
    "IpcStaleLayoutError",
    "LayoutEntry",
    "check_allocator",
    "device_uuids",
    "layout_digest",
    "layout_of",
    "local_index",
    "open_storage",
    "plan_copies",
    "share_storage",
]


class IpcError(RuntimeError):
    """A CUDA-IPC transfer that cannot proceed (the message says why)."""


class IpcDeviceError(IpcError):
    """The handle comes from another GPU than the one this process needs."""


class IpcStaleLayoutError(IpcError):
    """The sync was prepared against another export than the one mapped: re-send the export first."""


@dataclass(frozen=True)
class LayoutEntry:
    name: str
    bucket: int
    offset: int
    numel: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * torch_dtype(self.dtype).itemsize

    def to_list(self) -> list:
        return [self.name, self.bucket, self.offset, self.numel, self.dtype, list(self.shape)]

    @classmethod
    def from_list(cls, v: Sequence) -> LayoutEntry:
        name, bucket, offset, numel, dtype, shape = v
        return cls(str(name), int(bucket), int(offset), int(numel), dtype_name(torch_dtype(dtype)),
                   tuple(int(s) for s in shape))


_BIN = ("handle", "ref_counter_handle", "event_handle")


@dataclass(frozen=True)
class BufferHandle:
    """`UntypedStorage._share_cuda_()` of one buffer, as plain fields (`device` is the producer's index)."""

    device: int
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool

    def to_dict(self, binary: str = "bytes") -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if binary == "base64":
            d.update({k: base64.b64encode(d[k]).decode("ascii") for k in _BIN})
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> BufferHandle:
        b = {k: (base64.b64decode(d[k]) if isinstance(d[k], str) else bytes(d[k] or b"")) for k in _BIN}
        return cls(int(d["device"]), b["handle"], int(d["size_bytes"]), int(d["offset_bytes"]),
                   b["ref_counter_handle"], int(d["ref_counter_offset"]), b["event_handle"],
                   bool(d["event_sync_required"]))


def layout_digest(layout: Sequence[LayoutEntry], sizes: Sequence[int]) -> str:
    """sha256 of the layout (in order) and the buffers' byte sizes."""
    blob = json.dumps([[e.to_list() for e in layout], [int(s) for s in sizes]], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class IpcExport:
    """What the engine needs to map the trainer's buffers: plain data (see the module docstring)."""

    uuid: str
    buffers: list[BufferHandle]
    sizes: list[int]
    layout: list[LayoutEntry]
    digest: str = ""
    export_id: str = ""
    event: bytes = b""  # cudaIpcEventHandle of the trainer's ready event (empty: the trainer syncs)

    def __post_init__(self) -> None:
        self.digest = self.digest or layout_digest(self.layout, self.sizes)
        h = hashlib.sha256(self.digest.encode() + self.uuid.encode())
        for b in self.buffers:
            h.update(b.handle + b"|%d|%d|" % (b.offset_bytes, b.size_bytes) + b.ref_counter_handle)
        self.export_id = self.export_id or h.hexdigest()[:32]

    def to_dict(self, binary: str = "bytes") -> dict:
        ev = base64.b64encode(self.event).decode("ascii") if binary == "base64" else self.event
        return {"uuid": self.uuid, "buffers": [b.to_dict(binary) for b in self.buffers], "sizes": list(self.sizes),
                "layout": [e.to_list() for e in self.layout], "digest": self.digest,
                "export_id": self.export_id, "event": ev}

    @classmethod
    def from_dict(cls, d: Mapping) -> IpcExport:
        ev = d.get("event") or b""
        out = cls(str(d["uuid"]), [BufferHandle.from_dict(b) for b in d["buffers"]], [int(s) for s in d["sizes"]],
                  [LayoutEntry.from_list(e) for e in d["layout"]], "", "",
                  base64.b64decode(ev) if isinstance(ev, str) else bytes(ev))
        for key in ("digest", "export_id"):  # recomputed from the content; a given one must agree
            if d.get(key) and d[key] != getattr(out, key):
                raise IpcError(f"IPC export: the content does not match its {key} (corrupted or edited in transit)")
        return out


# ---- pure helpers (CPU-testable) ------------------------------------------------------------------
def layout_of(params: Mapping[str, torch.Tensor]) -> tuple[list[torch.UntypedStorage], list[LayoutEntry]]:
    """The distinct storages holding `params` (first-use order) and every tensor's place in them.
    Raises IpcError for a non-contiguous tensor or tensors on several devices."""
    storages: list[torch.UntypedStorage] = []
    index: dict[int, int] = {}
    layout, devices = [], set()
    for name, t in params.items():
        t = t.detach()
        if not t.is_contiguous():
            raise IpcError(f"{name}: not contiguous; CUDA IPC shares contiguous bytes only")
        devices.add(t.device)
        if t.numel() == 0:  # nothing to share (its storage may be a null pointer)
            layout.append(LayoutEntry(name, -1, 0, 0, dtype_name(t.dtype), tuple(t.shape)))
            continue
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in index:
            index[key] = len(storages)
            storages.append(st)
        offset = t.data_ptr() - key
        layout.append(LayoutEntry(name, index[key], offset, t.numel(), dtype_name(t.dtype), tuple(t.shape)))
    if len(devices) > 1:
        raise IpcError(f"parameters on several devices {sorted(map(str, devices))}; one GPU per export")
    return storages, layout


def local_index(uuid: str, uuids: Sequence[str], want: int | None = None) -> int:
    """This process's index of the physical GPU `uuid` (its CUDA_VISIBLE_DEVICES may differ from the
    producer's). `want`: the device the consumer's tensors live on, which must be that GPU."""
    if uuid not in uuids:
        raise IpcDeviceError(f"CUDA IPC handle from GPU {uuid}, which this process does not see (it sees "
                             f"{list(uuids)}); IPC needs trainer and engine on the same physical GPU")
    i = list(uuids).index(uuid)
    if want is not None and i != want:
        raise IpcDeviceError(f"CUDA IPC handle from GPU {uuid} (cuda:{i} here), but this engine runs on "
                             f"cuda:{want} ({uuids[want]}); IPC needs trainer and engine on the same GPU")
    return i


def device_uuids() -> list[str]:
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def check_allocator() -> None:
    """Refuse expandable segments: their memory is not shareable through cudaIpcGetMemHandle."""
    conf = (os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", ""))
    if "expandable_segments:true" in conf.replace(" ", "").lower():
        raise IpcError("CUDA IPC export needs PyTorch's allocator without expandable segments "
                       "(PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True)")


def share_storage(storage: torch.UntypedStorage) -> BufferHandle:
    """Export one CUDA storage (torch records an IPC event the opener waits on once)."""
    return BufferHandle(*storage._share_cuda_())


def open_storage(h: BufferHandle, device: int) -> torch.UntypedStorage:
    """Open a handle on local device `device` (torch caches opens per handle within a process)."""
    torch.cuda._lazy_init()
    return torch.UntypedStorage._new_shared_cuda(device, h.handle, h.size_bytes, h.offset_bytes,
                                                 h.ref_counter_handle, h.ref_counter_offset,
                                                 h.event_handle, h.event_sync_required)


def _u8(storage: torch.UntypedStorage) -> torch.Tensor:
    """The whole storage as a 1-D uint8 tensor (shares it)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


# ---- trainer side -----------------------------------------------------------------------------------
class IpcExporter:
    """Exports the storages of fixed `params` once; `current()` re-exports only when they moved."""

    def __init__(self, params: Mapping[str, torch.Tensor], use_event: bool = False) -> None:
        self.params = params
        self.use_event = use_event
        self._event: torch.cuda.Event | None = None
        self._export: IpcExport | None = None
        self._key: tuple | None = None
        self._storages: list[torch.UntypedStorage] = []

    def _layout(self) -> tuple[list[torch.UntypedStorage], list[LayoutEntry], tuple]:
        storages, layout = layout_of(self.params)
        return storages, layout, (tuple(s.data_ptr() for s in storages), tuple(layout))

    def current(self) -> IpcExport:
        """The export for the params as they lie now (cheap check of pointers and layout each call)."""
        storages, layout, key = self._layout()
        if self._export is not None and key == self._key:
            return self._export
        if any(s.device.type != "cuda" for s in storages):
            raise IpcError("CUDA IPC export needs CUDA parameters")
        check_allocator()
        dev = storages[0].device if storages else torch.device("cuda", torch.cuda.current_device())
        with torch.cuda.device(dev):
            handles = [share_storage(s) for s in storages]
            if self.use_event and self._event is None:
                self._event = torch.cuda.Event(interprocess=True)
                self._event.record()
            event = bytes(self._event.ipc_handle()) if self._event is not None else b""
        uuid = str(torch.cuda.get_device_properties(dev).uuid)
        self._storages, self._key = storages, key  # keeps the exported memory alive while exported
        self._export = IpcExport(uuid, handles, [s.nbytes() for s in storages], layout, event=event)
        return self._export

    def mark_ready(self) -> None:
        """Call after the trainer's last write and before telling the engine to copy."""
        if self._event is not None:
            self._event.record()
        elif torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        self.params, self._export, self._key, self._storages, self._event = {}, None, None, [], None
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()


# ---- engine side --------------------------------------------------------------------------------------
from .ipc_plan import CopyPlan, plan_copies  # noqa: E402 -- engine-side half of the module, imported where it begins

Opener = Callable[[BufferHandle, int], torch.UntypedStorage]


class IpcMapping:
    """The engine's view of one trainer export: buffers opened once, copy plans built once per target set.
    `opener` / `uuids` are injectable for tests (default: torch's CUDA IPC and this process's GPUs)."""

    def __init__(self, device: torch.device | int | None = None, opener: Opener = open_storage,
                 uuids: Sequence[str] | None = None) -> None:
        self._want = None if device is None else torch.device("cuda", device) if isinstance(device, int) \
            else torch.device(device)
        self._opener, self._uuids = opener, uuids
        self.export: IpcExport | None = None
        self.buffers: list[torch.Tensor] = []
        self.event: Any = None
        self._plans: dict[Any, CopyPlan] = {}

    @property
    def export_id(self) -> str | None:
        return self.export.export_id if self.export is not None else None

    def ensure(self, export: IpcExport | Mapping) -> bool:
        """Map `export` unless it is the one mapped; True when (re)mapped. A different export closes the
        old mapping first (plans into the old buffers are dropped with it)."""
        export = export if isinstance(export, IpcExport) else IpcExport.from_dict(export)
        if export.export_id == self.export_id:
            return False
        self.close()
        uuids = list(self._uuids) if self._uuids is not None else device_uuids()
        want = self._want.index if self._want is not None and self._want.type == "cuda" else None
        index = local_index(export.uuid, uuids, want)
        storages = [self._opener(h, index) for h in export.buffers]
        for st, size in zip(storages, export.sizes):
            if st.nbytes() < size:
                raise IpcError(f"opened IPC buffer has {st.nbytes()} bytes, the export says {size}")
        self.buffers = [_u8(st)[:size] for st, size in zip(storages, export.sizes)]
        if export.event:
            self.event = torch.cuda.Event.from_ipc_handle(torch.device("cuda", index), export.event)
        self.export = export
        return True

    def plan(self, targets: Mapping[str, torch.Tensor], key: Any = None, skip: Sequence[str] = ()) -> CopyPlan:
        """The copy plan into `targets` (cached under `key`; pass a new key when the targets changed)."""
        if self.export is None:
            raise IpcError("no trainer export mapped")
        if key not in self._plans:
            self._plans[key] = plan_copies(self.export.layout, self.buffers, targets, skip)
        return self._plans[key]

    def drop_plans(self) -> None:
        self._plans.clear()
    def check(self, export_id: str) -> None:
        if self.export is None or export_id != self.export.export_id:
            raise IpcStaleLayoutError(f"sync prepared for trainer export {export_id}, mapped "
                                      f"{self.export_id}: map the current export first")

    def wait_ready(self) -> None:
        """Order this stream after the trainer's ready event (no-op when the trainer synchronizes)."""
        if self.event is not None:
            self.event.wait(torch.cuda.current_stream())

    def copy(self, export_id: str, plan: CopyPlan) -> None:
        """One dense sync: check the export, wait for the trainer, run the copies (not synchronized)."""
        self.check(export_id)
        self.wait_ready()
        with torch.no_grad():
            plan.run()

    def close(self) -> None:
        """Drop every view of the trainer's memory; torch then closes the handles."""
        self._plans.clear()
        self.buffers, self.export, self.event = [], None, None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.ipc_collect()
