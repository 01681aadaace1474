"""The trainer's side of the "cuda_ipc" transport (wsync.sync.transports.CudaIpc): one IPC session per
engine on the trainer's own GPU, kept under the transfer group's name in ``TrainerCore.groups``.

A session is an ``IpcExporter`` over the trainer's parameters (already laid out in flat buckets by
transfer.flat, so a few buffers serve every tensor) and an ``IpcStaging`` buffer for sparse syncs.
One exporter per engine (torch counts each export once). Call order per sync, driven by the sync layer:

  ipc_open(group, rank, engine_uuid) -> export dict   once per session (the engine maps it at join)
  ipc_dense_ready(group) -> {rank: IpcDense}          re-export only when the layout/buffers changed
                                                      (a reload, a reset), then one stream sync
  ipc_sparse_write(group, patch_id, metas) -> {rank: IpcSparse}   write the staging (flat format,
                                                      transfer/ipc_flat.py), one stream sync
  ipc_sent(group) -> TransferStats                    what the last ready/write moved
  close_group(group) -> ipc_close(group)              drop the exports and staging, ipc_collect

The engine copies only after the ready call returned, and the next write only happens after every
engine returned (the sync layer waits), so the staging buffer is never overwritten while read."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from wsync.engines.contract import IPC_FLAT, IpcDense, IpcSparse, normalize_gpu_uuid
from wsync.transfer.meta import TransferStats
from wsync.transfer.sparse import SparseMeta, payload_bytes


class TrainerIpcError(RuntimeError):
    pass


def gpu_uuid_of(device: torch.device) -> str | None:
    """"GPU-<uuid>" of the physical GPU behind ``device``; None on CPU or when torch cannot say."""
    if device.type != "cuda":
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except Exception:  # noqa: BLE001 - an old torch: no uuid
        return None
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


@dataclass
class IpcSession:
    """One engine's session: the trainer's exporter and staging, and what the engine was last sent."""

    exporter: object
    staging: object
    sent_export: str | None = None
    sent_staging: str | None = None
    stats: TransferStats = field(default_factory=lambda: TransferStats(bytes=0))


class TrainerIpcMixin:
    """ipc_* methods of TrainerCore (needs self.device, self.params, self.groups, self._patch,
    self._current_params)."""

    def gpu_uuid(self) -> str | None:
        return gpu_uuid_of(self.device)

    def gpu_memory(self) -> dict:
        """Free/total bytes of the trainer's GPU, what this process allocated, and the weights' bytes."""
        out = {"param_bytes": sum(p.numel() * p.element_size() for p in self.params.values())}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            out.update(free=free, total=total, allocated=torch.cuda.memory_allocated(self.device))
        return out

    def _sessions(self, group: str) -> dict[int, IpcSession]:
        found = self.groups.get(group)
        if found is None or found[0] != "ipc":
            raise TrainerIpcError(f"trainer has no open cuda_ipc session group {group!r}")
        return found[1]

    def ipc_open(self, group: str, rank: int, engine_uuid: str | None) -> dict:
        """Open the session for the engine at ``rank`` of ``group``: export the parameters' buffers.
        Refuses (IpcDeviceError) an engine on another GPU than the trainer's."""
        from wsync.transfer.ipc import IpcDeviceError, IpcExporter
        from wsync.transfer.ipc_sparse import IpcStaging

        self._require_model()
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()  # memory of sessions whose engines released their mapping since
        mine = gpu_uuid_of(self.device)
        if not normalize_gpu_uuid(mine) or normalize_gpu_uuid(mine) != normalize_gpu_uuid(engine_uuid):
            raise IpcDeviceError(f"cuda_ipc: the engine at rank {rank} is on GPU {engine_uuid or 'unknown'}, the "
                                 f"trainer on {mine or self.device}; CUDA IPC needs both on the same physical GPU")
        found = self.groups.get(group)
        if found is not None and found[0] != "ipc":
            self.close_group(group)
        sessions = self.groups.setdefault(group, ("ipc", {}))[1]
        old = sessions.pop(int(rank), None)
        if old is not None:
            _close_session(old)
        session = IpcSession(IpcExporter(self.params), IpcStaging(self.device))
        sessions[int(rank)] = session
        export = session.exporter.current()
        session.sent_export = export.export_id
        return export.to_dict()

    def ipc_sessions(self, group: str, expected: int) -> list[int]:
        """The trainer's side of opening ``group``: every one of ``expected`` sessions is open."""
        ranks = sorted(self._sessions(group))
        if ranks != list(range(1, int(expected) + 1)):
            raise TrainerIpcError(f"cuda_ipc group {group!r}: sessions for ranks {ranks}, expected 1..{expected}")
        return ranks

    def ipc_dense_ready(self, group: str) -> dict[int, IpcDense]:
        """Ready every session of ``group`` for a dense copy: the current export (re-exported when the
        parameters were re-allocated, e.g. by a reload; sent along only when it changed), then one
        stream sync so the engines read finished weights."""
        t0 = time.perf_counter()
        out: dict[int, IpcDense] = {}
        for rank, session in self._sessions(group).items():
            if session.exporter.params is not self.params:  # a reload/reset replaced the tensors
                from wsync.transfer.ipc import IpcExporter

                session.exporter.close()
                session.exporter = IpcExporter(self.params)
            export = session.exporter.current()
            changed = export.export_id != session.sent_export
            out[rank] = IpcDense(export.export_id, export.to_dict() if changed else None)
            session.sent_export = export.export_id
        self._ipc_ready(group)
        nbytes = sum(p.numel() * p.element_size() for p in self.params.values())
        stats = TransferStats(bytes=nbytes, wire_bytes=nbytes, ms=(time.perf_counter() - t0) * 1e3,
                              messages=len(out), zero_copy=len(out))
        self._ipc_record(group, stats)
        return out

    def ipc_sparse_write(self, group: str, patch_id: str, metas: list[SparseMeta]) -> dict[int, IpcSparse]:
        """Write the held patch into every session's staging buffer in the flat format
        (transfer/ipc_flat.py: no planning, no encoding, a handful of kernels; grown and re-exported only
        when too small), then one stream sync. Engines get the flat metas (plain lists) with the staging
        id. ``metas`` (the sync layer's plan) only describe the sync for its report and the engines'
        checks; the payload recorded is the patch's indices + values (transfer.sparse.payload_bytes), the
        wire the flat bytes written."""
        t0 = time.perf_counter()
        patches = self._patch(patch_id)
        missing = [p.name for p in patches if p.name not in self.params]
        if missing:
            raise TrainerIpcError(f"patch {patch_id} names tensors the trainer does not hold: {missing[:3]}")
        shapes = {p.name: tuple(self.params[p.name].shape) for p in patches}
        out: dict[int, IpcSparse] = {}
        wire = 0
        for rank, session in self._sessions(group).items():
            flat, wire, grew = session.staging.write_flat(patches, shapes)
            export = session.staging.export()
            changed = grew or export["staging_id"] != session.sent_staging
            out[rank] = IpcSparse(export["staging_id"], dict(export) if changed else None, IPC_FLAT,
                                  [m.to_list() for m in flat])
            session.sent_staging = export["staging_id"]
        self._ipc_ready(group)
        stats = TransferStats(bytes=payload_bytes(patches), wire_bytes=wire, ms=(time.perf_counter() - t0) * 1e3,
                              messages=len(out))
        self._ipc_record(group, stats)
        return out

    def ipc_sent(self, group: str) -> TransferStats:
        """What the last ready/write of ``group`` moved (the cuda_ipc transport's send)."""
        sessions = self._sessions(group)
        return next(iter(sessions.values())).stats if sessions else TransferStats(bytes=0)

    def ipc_close(self, group: str) -> None:
        found = self.groups.pop(group, None)
        if found is not None and found[0] == "ipc":
            for session in found[1].values():
                _close_session(session)

    def _ipc_ready(self, group: str) -> None:
        for session in self._sessions(group).values():
            session.exporter.mark_ready()
            break  # one stream sync covers every session (same device, same stream)

    def _ipc_record(self, group: str, stats: TransferStats) -> None:
        for session in self._sessions(group).values():
            session.stats = stats


def _close_session(session: IpcSession) -> None:
    for part in (session.exporter, session.staging):
        try:
            part.close()
        except Exception:  # noqa: BLE001 - teardown is best effort; the next ipc_collect frees the rest
            pass
