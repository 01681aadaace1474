"""The one send path: what the built-in trainer actor and a user's `Publisher` both call to put a
weight source or a patch on a wsync group as its rank 0, and to diff live weights against a baseline.

Everything here is rank-0 sending (or, for a sharded source, every rank gathering and rank 0 sending)
over `transfer.group.SyncGroup`; receivers are `transfer.dense.DenseReceiver` / `transfer.sparse.recv_sparse`
exactly as for any other sync.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from wsync.transfer.delta import Snapshot, diff_patches
from wsync.transfer.dense import send_dense
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.group import SyncGroup
from wsync.transfer.meta import TransferStats
from wsync.transfer.sparse import SparseMeta, SparsePatch, send_sparse

from .source import WeightSource

__all__ = ["add_stats", "diff_source", "send_patches", "send_source_dense"]


def add_stats(total: TransferStats, part: TransferStats) -> None:
    total.bytes += part.bytes
    total.wire_bytes += part.wire_bytes
    total.ms += part.ms
    total.messages += part.messages
    total.zero_copy += part.zero_copy


def send_source_dense(group: SyncGroup | None, source: WeightSource, bucket_bytes: int,
                      with_fingerprints: bool = False,
                      keep: dict[str, torch.Tensor] | None = None) -> tuple[TransferStats, dict[str, str]]:
    """Dense-send every tensor of ``source`` (the wire of `transfer.dense.send_dense`, same buckets).

    ``group`` None: this rank only takes part in a sharded source's gathers (not rank 0). A sharded
    source is sent one gathered bucket per `send_dense` call (same bucket boundaries, so receivers
    cannot tell). ``with_fingerprints``: fingerprints of exactly what was sent, computed chunk by chunk.
    ``keep``: filled with {name: tensor sent} (gathered tensors of a sharded source are fresh, so
    keeping them costs no copy; an unsharded source's are the live tensors themselves)."""
    stats, fps = TransferStats(), {}
    for chunk in source.chunks(bucket_bytes):
        if group is not None:
            add_stats(stats, send_dense(group, chunk, bucket_bytes))
            if with_fingerprints:
                fps.update(fingerprint(chunk))
            if keep is not None:
                keep.update(chunk)
    return stats, fps


def _to_group_device(patches: Sequence[SparsePatch], group: SyncGroup) -> list[SparsePatch]:
    """NCCL sends only device tensors: patches diffed on a CPU baseline move to the group's device."""
    if group.backend != "nccl":
        return list(patches)
    return [p if p.values.device == group.device else p.to(group.device) for p in patches]


def send_patches(group: SyncGroup, patches: Sequence[SparsePatch], metas: Sequence[SparseMeta],
                 params: Mapping[str, torch.Tensor] | None = None) -> TransferStats:
    """Sparse-send planned patches (`transfer.sparse.send_sparse`); ``params`` only when the live
    tensors equal baseline + patch (the planner may have picked the dense encoding from them)."""
    return send_sparse(group, _to_group_device(patches, group), metas, params)


def diff_source(baselines: Snapshot, version: str, source: WeightSource, bucket_bytes: int,
                with_fingerprints: bool = False) -> tuple[list[SparsePatch], dict[str, str]]:
    """Bit-exact patches from the baseline ``version`` to the live weights (`transfer.delta`), and
    optionally the live weights' fingerprints. A sharded source is gathered bucket by bucket (every
    rank must call this; ranks other than 0 pass an empty Snapshot and get nothing back)."""
    if not source.sharded:
        live = source.local()
        return baselines.diff(version, live), (fingerprint(live) if with_fingerprints else {})
    patches: list[SparsePatch] = []
    fps: dict[str, str] = {}
    held = baselines.get(version) if version in baselines else None
    for chunk in source.chunks(bucket_bytes):
        if held is None:
            continue
        dev = next(iter(held.values())).device if held else chunk[0][1].device
        moved = [(n, t if t.device == dev else t.to(dev)) for n, t in chunk]
        patches += diff_patches(moved, {n: held[n] for n, _ in moved})
        if with_fingerprints:
            fps.update(fingerprint(chunk))
    return patches, fps
