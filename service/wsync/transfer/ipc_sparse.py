"""Sparse syncs over CUDA IPC: one staging buffer owned by the trainer, mapped once by the engine.

Staging byte layout for one sync (`staging_layout`), all offsets 8-byte aligned, zero padding:
  [0, stream)  the packed stream of the non-flat metas, exactly as `sparse.pack_stream` builds it
               (`sparse.stream_layout`: metas order, each section padded to 8 bytes);
  then, per flat_int32 meta in metas order: int32 indices (count * 4, padded to 8), then values
               (count * itemsize, padded to 8).
The trainer writes it on the device (`IpcStaging.write`: batched encode, one copy into the buffer, no
host sync after `plan_sparse`'s), calls `mark_ready()` (one stream sync) and hands the engine the metas
and the staging id. The engine decodes from the mapped buffer on the GPU (`decode_many`: one host sync),
checks every index is in range (one host sync; nothing is written when one is not) and scatters
(`apply.apply_patches`), then synchronizes once. The trainer must not write the next sync before the
engine returned (decoded values may alias the staging buffer until they are applied).

Flat format ("ipc_flat", transfer/ipc_flat.py): `IpcStaging.write_flat(patches, shapes)` (no planning,
no encoding, a handful of kernels, no host sync) and `StagingMapping.flat(staging_id, metas)` (views) feed
`ipc_flat.apply_flat`, one scatter per dtype run whatever the tensor count; same buffer, same staging id.
The service's cuda_ipc sparse syncs use the flat format (`apply_flat_to`: per tensor from the same views
only where an engine's target cannot be addressed flat); the encoded stream above stays for other senders.

The buffer grows (x1.5, 2 MiB granules) only when a sync does not fit; growing re-exports it under a new
`staging_id`, and the engine refuses a sync naming another id (`IpcStaleLayoutError`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .encodings import FLAT, SparseMeta, SparsePatch, decode_many
from .ipc import (
    BufferHandle,
    IpcError,
    IpcStaleLayoutError,
    check_allocator,
    device_uuids,
    local_index,
    open_storage,
    share_storage,
)
from .ipc_flat import FlatMeta, FlatStaged, apply_flat, flat_layout, flat_metas, flat_ranges, read_flat, write_flat
from .meta import dtype_name
from .sparse import pack_stream, stream_layout

__all__ = ["IpcStaging", "StagingMapping", "apply_flat_to", "flat_patches", "in_range", "read_staging",
           "staging_layout", "write_staging"]
ALIGN = 8
GRANULE = 2 << 20


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class StagingLayout:
    stream_bytes: int
    flat: dict[str, tuple[int, int]]  # name -> (indices offset, values offset)
    total: int


def staging_layout(metas: Sequence[SparseMeta]) -> StagingLayout:
    stream = stream_layout(metas)[1]
    flat, off = {}, stream
    for m in metas:
        if m.encoding == FLAT:
            flat[m.name] = (off, off + _up(m.count * 4))
            off += _up(m.count * 4) + _up(m.count * m.spec.itemsize)
    return StagingLayout(stream, flat, off)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().view(-1)
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def write_staging(buf: torch.Tensor, metas: Sequence[SparseMeta], patches: Sequence[SparsePatch],
                  params: Mapping[str, torch.Tensor] | None = None) -> int:
    """Write one sync's bytes into `buf` (uint8, on the patches' device); returns the bytes used."""
    lay = staging_layout(metas)
    if lay.total > buf.numel():
        raise IpcError(f"staging buffer of {buf.numel()} bytes, this sync needs {lay.total}")
    with torch.no_grad():
        if lay.stream_bytes:
            buf[:lay.stream_bytes].copy_(pack_stream(patches, metas, params, buf.device))
        by_name = {p.name: p for p in patches}
        for m in metas:
            if m.encoding != FLAT or m.count == 0:
                continue
            p, (io, vo) = by_name[m.name], lay.flat[m.name]
            if p.count != m.count:
                raise IpcError(f"{m.name}: patch has {p.count} elements, its meta {m.count}")
            buf[io:io + m.count * 4].copy_(_bytes(p.indices.to(torch.int32)))
            buf[vo:vo + m.count * m.spec.itemsize].copy_(_bytes(p.values))
    return lay.total


def read_staging(buf: torch.Tensor, metas: Sequence[SparseMeta]) -> list[SparsePatch]:
    """The patches of one sync (metas order) from `buf`: packed ones decoded on its device, flat ones as
    views (alias `buf`)."""
    lay = staging_layout(metas)
    if lay.total > buf.numel():
        raise IpcError(f"the metas describe {lay.total} staged bytes, the mapped buffer has {buf.numel()}")
    offsets, _ = stream_layout(metas)
    packed = [m for m in metas if m.encoding != FLAT]
    decoded = iter(decode_many(packed, [buf[o:o + m.nbytes] for m, o in zip(packed, offsets)]))
    out = []
    for m in metas:
        if m.encoding != FLAT:
            out.append(next(decoded))
            continue
        io, vo = lay.flat[m.name]
        idx = buf[io:io + m.count * 4].view(torch.int32)
        vals = buf[vo:vo + m.count * m.spec.itemsize].view(m.spec.torch_dtype)
        out.append(SparsePatch(m.name, idx, vals))
    return out


def in_range(patches: Sequence[SparsePatch], numels: Sequence[int]) -> bool:
    """0 <= index < numel for every index of every non-empty patch: one host sync."""
    live = [(p, n) for p, n in zip(patches, numels) if p.count]
    if not live:
        return True
    idx = [p.indices for p, _ in live]
    try:  # one fused multi-tensor max where the build has it
        hi = torch.stack(torch._foreach_max(idx)).long()
    except (AttributeError, NotImplementedError, RuntimeError):
        hi = torch.stack([i.max().long() for i in idx])
    lo = torch.cat(idx).min().long()
    limit = torch.tensor([n for _, n in live], dtype=torch.int64, device=hi.device)
    return bool((hi < limit).all() & (lo >= 0))


def flat_patches(staged: FlatStaged) -> list[SparsePatch]:
    """Per-tensor views of a flat sync (aliasing the buffer; no kernel)."""
    lay, out = staged.layout, []
    for i, m in enumerate(staged.metas):
        a, b, first = lay.starts[i], lay.starts[i + 1], lay.values[m.dtype][2]
        out.append(SparsePatch(m.name, staged.indices[a:b], staged.values[m.dtype][a - first:b - first]))
    return out


def apply_flat_to(targets: Mapping[str, torch.Tensor], staged: FlatStaged) -> dict:
    """Apply a flat sync (ipc_flat) into ``targets`` (name -> tensor; every meta must name one of its dtype
    and numel, else ValueError before any write). ``ipc_flat.apply_flat`` over the named targets; the only
    case where that flat scatter is impossible is a target that cannot be addressed as (storage, element
    offset) -- not contiguous, or misaligned -- and then the sync goes per tensor from the same views
    (``apply.apply_patches``), after the same all-or-nothing range check. ValueError on a bad index,
    nothing written. Not synchronized. Returns apply_flat's counts (+ "per_tensor")."""
    from .apply import apply_patches

    sub = {}
    for m in staged.metas:
        t = targets.get(m.name)
        if t is None or dtype_name(t.dtype) != m.dtype or t.numel() != m.numel:
            raise ValueError(f"{m.name}: not a target of {m.dtype} with {m.numel} elements")
        sub[m.name] = t
    try:
        ranges = flat_ranges(sub)
    except ValueError:  # flat impossible for this engine's tensors: per tensor, same staged bytes
        live = [p for p in flat_patches(staged) if p.count]
        if live and not in_range(live, [sub[p.name].numel() for p in live]):
            raise ValueError("sparse index out of range; nothing was applied") from None
        apply_patches(sub, live)
        return {"elements": staged.layout.count, "scatters": len(live), "chunks": 0, "per_tensor": True}
    return {**apply_flat(ranges, staged), "per_tensor": False}


class IpcStaging:
    """The trainer's staging buffer: allocated lazily, grown only when too small, exported per size."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.buf: torch.Tensor | None = None
        self._handle: dict | None = None
        self.generation = 0

    @property
    def capacity(self) -> int:
        return 0 if self.buf is None else self.buf.numel()

    def ensure(self, nbytes: int) -> bool:
        """Room for `nbytes`; True when the buffer was (re)allocated and must be re-sent to the engine."""
        if nbytes <= self.capacity and self.buf is not None:
            return False
        check_allocator()
        size = max(GRANULE, -(-max(int(nbytes * 1.5), self.capacity * 3 // 2) // GRANULE) * GRANULE)
        self.buf, self._handle = None, None
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()  # an older buffer the engine released
        self.buf = torch.zeros(size, dtype=torch.uint8, device=self.device)
        self.generation += 1
        return True

    def export(self) -> dict:
        """Plain data the engine maps with `StagingMapping.ensure` (binary fields as bytes)."""
        if self.buf is None:
            self.ensure(1)
        assert self.buf is not None
        if self._handle is None:
            h = share_storage(self.buf.untyped_storage())
            uuid = str(torch.cuda.get_device_properties(self.device).uuid)
            self._handle = {"uuid": uuid, "size": self.capacity, "buffer": h.to_dict(),
                            "staging_id": f"{uuid[-12:]}-{self.generation}-{h.handle.hex()[:16]}"}
        return self._handle

    @property
    def staging_id(self) -> str:
        return self.export()["staging_id"]

    def write(self, metas: Sequence[SparseMeta], patches: Sequence[SparsePatch],
              params: Mapping[str, torch.Tensor] | None = None) -> tuple[int, bool]:
        """(bytes written, whether the buffer was re-allocated: send `export()` to the engine first)."""
        grew = self.ensure(staging_layout(metas).total)
        assert self.buf is not None
        return write_staging(self.buf, metas, patches, params), grew

    def write_flat(self, patches: Sequence[SparsePatch],
                   shapes: Mapping[str, Sequence[int]]) -> tuple[list[FlatMeta], int, bool]:
        """The flat format (ipc_flat): (metas in flat order, bytes written, whether the buffer was
        re-allocated: send `export()` to the engine first). No host sync; call the transport's mark_ready()
        before the engine reads. Send `[m.to_list() for m in metas]` with the staging id."""
        metas = flat_metas(patches, shapes)
        grew = self.ensure(flat_layout(metas).total)
        assert self.buf is not None
        return metas, write_flat(self.buf, metas, patches), grew

    def close(self) -> None:
        self.buf, self._handle = None, None
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()


class StagingMapping:
    """The engine's mapping of the trainer's staging buffer (opened once per staging id)."""

    def __init__(self, device_index: int | None = None, opener=open_storage, uuids: Sequence[str] | None = None):
        self._want, self._opener, self._uuids = device_index, opener, uuids
        self.staging_id: str | None = None
        self.buf: torch.Tensor | None = None

    def ensure(self, export: Mapping) -> bool:
        if export["staging_id"] == self.staging_id:
            return False
        self.close()
        uuids = list(self._uuids) if self._uuids is not None else device_uuids()
        index = local_index(str(export["uuid"]), uuids, self._want)
        st = self._opener(BufferHandle.from_dict(export["buffer"]), index)
        size = int(export["size"])
        if st.nbytes() < size:
            raise IpcError(f"opened staging buffer has {st.nbytes()} bytes, the export says {size}")
        self.buf = torch.empty(0, dtype=torch.uint8, device=st.device).set_(st, 0, (size,), (1,))
        self.staging_id = str(export["staging_id"])
        return True

    def patches(self, staging_id: str, metas: Sequence[SparseMeta]) -> list[SparsePatch]:
        if self.buf is None or staging_id != self.staging_id:
            raise IpcStaleLayoutError(f"sparse sync staged in {staging_id}, mapped {self.staging_id}: "
                                      "map the trainer's current staging buffer first")
        return read_staging(self.buf, metas)

    def flat(self, staging_id: str, metas: Sequence) -> FlatStaged:
        """Views of a flat-format sync (ipc_flat.read_flat); same staleness rule as `patches`."""
        if self.buf is None or staging_id != self.staging_id:
            raise IpcStaleLayoutError(f"sparse sync staged in {staging_id}, mapped {self.staging_id}: "
                                      "map the trainer's current staging buffer first")
        return read_flat(self.buf, metas)

    def close(self) -> None:
        self.buf, self.staging_id = None, None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.ipc_collect()
