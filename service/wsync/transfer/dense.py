"""Dense sync: every tensor, in a fixed order, packed into flat uint8 buckets and broadcast from rank 0."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .group import Handle, SyncGroup
from .meta import TensorMeta, Timer, TransferStats, bytes_view, first_device, param_metas, view_as_dtype
from .validate import check_metas

__all__ = ["plan_buckets", "send_dense", "recv_dense", "DenseReceiver", "TransferStats"]


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Indices into `metas`, in order, packed until the next tensor would overflow `bucket_bytes`.

    A tensor larger than `bucket_bytes` gets a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, meta in enumerate(metas):
        if current and size + meta.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += meta.nbytes
    if current:
        buckets.append(current)
    return buckets


def _bucket_bytes(metas: Sequence[TensorMeta], bucket: list[int]) -> int:
    return sum(metas[i].nbytes for i in bucket)


def _storage_view(tensors: Sequence[torch.Tensor], bucket: list[int], nbytes: int) -> torch.Tensor | None:
    """The bucket's bytes as one uint8 view of the tensors' own storage, when they lie back to back in
    bucket order (a single contiguous tensor, or parameters laid out by `flat.flatten_params`); else None.
    Sending or receiving through it needs no pack/unpack copy, and the wire is the same either way."""
    first = tensors[bucket[0]]
    storage, expected = first.untyped_storage(), first.data_ptr()
    for i in bucket:
        t = tensors[i]
        if t.numel() == 0:
            continue
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.data_ptr() != expected):
            return None
        expected += t.numel() * t.element_size()
    start = first.data_ptr() - storage.data_ptr()
    return torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage, start, (nbytes,), (1,))


def _is_direct(tensors: Sequence[torch.Tensor], bucket: list[int]) -> bool:
    return _storage_view(tensors, bucket, _bucket_nbytes(tensors, bucket)) is not None


def _bucket_nbytes(tensors: Sequence[torch.Tensor], bucket: list[int]) -> int:
    return sum(tensors[i].numel() * tensors[i].element_size() for i in bucket)


class _Slots:
    """Two alternating flat buffers; a slot is reused only after its last broadcast finished."""

    def __init__(self, device: torch.device, size: int) -> None:
        self.device = device
        self.size = size
        self.bufs: list[torch.Tensor | None] = [None, None]
        self.busy: list[tuple[Handle, Callable[[], None]] | None] = [None, None]
        self.turn = 0

    def release(self, slot: int) -> None:
        """Wait for the slot's broadcast and run its finish (e.g. the unpack), so it can be refilled."""
        pending, self.busy[slot] = self.busy[slot], None
        if pending is not None:
            pending[0].wait()
            pending[1]()

    def buffer(self, slot: int) -> torch.Tensor:
        """The slot's whole buffer, allocated on first use."""
        buf = self.bufs[slot]
        if buf is None:
            buf = self.bufs[slot] = torch.empty(self.size, dtype=torch.uint8, device=self.device)
        return buf

    def take(self, nbytes: int) -> tuple[int, torch.Tensor]:
        slot = self.turn
        self.release(slot)
        return slot, self.buffer(slot)[:nbytes]

    def occupy(self, slot: int, work: Handle, finish: Callable[[], None] = lambda: None) -> None:
        self.busy[slot], self.turn = (work, finish), 1 - slot

    def drain(self) -> None:
        for slot in (self.turn, 1 - self.turn):  # oldest first
            self.release(slot)


def _packed_size(metas: Sequence[TensorMeta], tensors: Sequence[torch.Tensor],
                 buckets: list[list[int]]) -> int:
    sizes = [_bucket_bytes(metas, b) for b in buckets if not _is_direct(tensors, b)]
    return max(sizes, default=0)


def _byte_pairs(tensors: Sequence[torch.Tensor], metas: Sequence[TensorMeta], bucket: list[int],
                buf: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """(the tensors' raw-byte views, the matching slices of `buf`) for one bucket, empty tensors left
    out; None when some tensor is not contiguous (no byte view of it exists)."""
    views, slices, offset = [], [], 0
    for i in bucket:
        n = metas[i].nbytes
        if n:
            if not tensors[i].is_contiguous():
                return None
            views.append(bytes_view(tensors[i]))
            slices.append(buf[offset:offset + n])
        offset += n
    return views, slices


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """dst[k].copy_(src[k]) for all k: one fused multi-tensor copy where the build has it."""
    if not dsts:
        return
    try:
        torch._foreach_copy_(dsts, srcs)
    except (AttributeError, NotImplementedError, RuntimeError):
        for d, s in zip(dsts, srcs):
            d.copy_(s)


def _pack(tensors: Sequence[torch.Tensor], metas: Sequence[TensorMeta], bucket: list[int],
          buf: torch.Tensor) -> None:
    pairs = _byte_pairs(tensors, metas, bucket, buf)
    if pairs is not None:
        _copy_all(pairs[1], pairs[0])
        return
    offset = 0
    for i in bucket:
        n = metas[i].nbytes
        if n:
            buf[offset:offset + n].copy_(bytes_view(tensors[i].contiguous()))
        offset += n


def _write_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy raw bytes `src` (uint8) into `dst`'s storage, bit-exact."""
    if dst.is_contiguous():
        bytes_view(dst).copy_(src)
    else:
        dst.copy_(view_as_dtype(src, dst.dtype).view(dst.shape))


def _unpack_fn(targets: Sequence[torch.Tensor], metas: Sequence[TensorMeta], bucket: list[int],
               buf: torch.Tensor) -> Callable[[], None]:
    """What writes a received bucket into `targets`: one fused copy of precomputed byte views when every
    target is contiguous (the views are built once, here), else a copy per tensor."""
    pairs = _byte_pairs(targets, metas, bucket, buf)
    if pairs is not None:
        dsts, srcs = pairs
        return lambda: _copy_all(dsts, srcs)

    def unpack() -> None:
        offset = 0
        for i in bucket:
            n = metas[i].nbytes
            if n:
                _write_bytes(targets[i], buf[offset:offset + n])
            offset += n
    return unpack


def send_dense(group: SyncGroup, named_tensors: Sequence[tuple[str, torch.Tensor]],
               bucket_bytes: int) -> TransferStats:
    """Broadcast every tensor from this rank (0) in `plan_buckets` order."""
    metas = param_metas(named_tensors)
    tensors = [t.detach() for _, t in named_tensors]
    buckets = plan_buckets(metas, bucket_bytes)
    device = first_device(tensors, group.device)
    slots = _Slots(device, _packed_size(metas, tensors, buckets))
    stats = TransferStats(bytes=sum(m.nbytes for m in metas))
    works: list[Handle] = []
    with torch.no_grad(), Timer(device) as timer:
        for bucket in buckets:
            nbytes = _bucket_bytes(metas, bucket)
            if nbytes == 0:
                continue
            view = _storage_view(tensors, bucket, nbytes)
            if view is not None:
                works.append(group.broadcast_async(view, src=0))
                stats.zero_copy += 1
            else:
                slot, buf = slots.take(nbytes)
                _pack(tensors, metas, bucket, buf)
                slots.occupy(slot, group.broadcast_async(buf, src=0))
            stats.wire_bytes += nbytes
            stats.messages += 1
        slots.drain()
        for work in works:
            work.wait()
    stats.ms = timer.ms
    return stats


class DenseReceiver:
    """Receives what `send_dense` sends into fixed `params`, any number of times.

    Built once (validation, bucket plan, the two staging buffers and every bucket's byte views), so a
    sync only posts one broadcast per bucket and, for a staged bucket, one fused copy out of it while
    the next bucket arrives. Buckets whose targets already lie back to back (`flat.flatten_params`, or
    one big tensor) are received in place. Keep one per (metas, params) while neither changes; the
    staging buffers (at most 2 x the largest staged bucket) live as long as the receiver.
    """

    def __init__(self, metas: Sequence[TensorMeta], bucket_bytes: int, params: Mapping[str, torch.Tensor],
                 device: torch.device | None = None) -> None:
        check_metas(metas, params)
        self.metas = list(metas)
        targets = [params[m.name].detach() for m in self.metas]
        self.device = first_device(targets, device or torch.device("cpu"))
        self.bytes = sum(m.nbytes for m in self.metas)
        planned = []  # (bucket, bytes, in-place view or None)
        for b in plan_buckets(self.metas, bucket_bytes):
            nbytes = _bucket_bytes(self.metas, b)
            if nbytes:
                planned.append((b, nbytes, _storage_view(targets, b, nbytes)))
        self._slots = _Slots(self.device, max((n for _, n, v in planned if v is None), default=0))
        # per bucket: (wire view, staging slot or -1, finish); the j-th staged bucket uses slot j % 2
        self.steps: list[tuple[torch.Tensor, int, Callable[[], None]]] = []
        staged = 0
        for b, nbytes, view in planned:
            if view is not None:
                self.steps.append((view, -1, lambda: None))
            else:
                slot, staged = staged % 2, staged + 1
                buf = self._slots.buffer(slot)[:nbytes]
                self.steps.append((buf, slot, _unpack_fn(targets, self.metas, b, buf)))

    def recv(self, group: SyncGroup) -> TransferStats:
        stats = TransferStats(bytes=self.bytes)
        works: list[Handle] = []
        with torch.no_grad(), Timer(self.device) as timer:
            for wire, slot, finish in self.steps:
                if slot < 0:
                    works.append(group.broadcast_async(wire, src=0))
                    stats.zero_copy += 1
                else:
                    self._slots.release(slot)  # its previous bucket is written out before the buffer is refilled
                    self._slots.occupy(slot, group.broadcast_async(wire, src=0), finish)
                stats.wire_bytes += wire.numel()
                stats.messages += 1
            self._slots.drain()
            for work in works:
                work.wait()
        stats.ms = timer.ms
        return stats


def recv_dense(group: SyncGroup, metas: Sequence[TensorMeta], bucket_bytes: int,
               params: Mapping[str, torch.Tensor]) -> TransferStats:
    """Receive what `send_dense` sends, writing straight into `params` (validated first). One-shot;
    keep a `DenseReceiver` to receive into the same parameters repeatedly."""
    return DenseReceiver(metas, bucket_bytes, params, group.device).recv(group)
