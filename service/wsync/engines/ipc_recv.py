"""An engine's receive side of the "cuda_ipc" transport, for engines whose parameters are plain torch
tensors in this process (the reference engine; vLLM's worker has its own, engines/vllm/ipc.py).

``IpcReceiver`` maps the trainer's export once (at join), and per sync:
- dense: maps a new export when the update carries one, checks the update names the mapped export
  (transfer.ipc.IpcStaleLayoutError otherwise: no byte moves), then runs the planned device copies
  (identical layouts: one copy per bucket) and synchronizes once;
- sparse: maps the staging buffer when new; the flat format (transfer/ipc_flat.py, what the service's
  trainer writes): one range check, one scatter per dtype run (``apply_flat_to``); the older encoded
  stream: decode on the GPU, range check, scatter per tensor. Nothing is applied when an index is out of
  range; synchronizes once.
``close()`` drops every view of the trainer's memory (torch then closes the handles)."""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence

import torch

from wsync.transfer.apply import apply_patches
from wsync.transfer.ipc import IpcError, IpcMapping
from wsync.transfer.ipc_sparse import StagingMapping, apply_flat_to, in_range
from wsync.transfer.sparse import SparseMeta

from .contract import IPC_FLAT, IpcDense, IpcSparse


class IpcReceiver:
    def __init__(self, device: torch.device):
        self.device = device
        self.mapping = IpcMapping(device if device.type == "cuda" and device.index is not None else None)
        self.staging = StagingMapping(device.index if device.type == "cuda" else None)

    def join(self, rendezvous: Mapping, rank: int) -> None:
        exports = rendezvous.get("exports") or {}
        export = exports.get(str(rank)) or exports.get(rank)
        if export is None:
            raise IpcError(f"cuda_ipc rendezvous carries no export for rank {rank}")
        self.mapping.ensure(export)

    def dense(self, ipc: IpcDense, targets: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """One dense sync into ``targets``; returns (bytes, copies)."""
        if ipc.export is not None:
            self.mapping.ensure(ipc.export)
        self.mapping.check(ipc.export_id)  # before any copy: never into or from stale offsets
        plan = self.mapping.plan(targets, key=ipc.export_id)
        self.mapping.copy(ipc.export_id, plan)
        _sync(self.device)
        return plan.bytes, plan.copies

    def sparse(self, ipc: IpcSparse, metas: Sequence[SparseMeta], targets: Mapping[str, torch.Tensor]) -> int:
        """One sparse sync into ``targets``; returns the elements applied. The flat format (what the
        service's trainer writes) goes through transfer.ipc_sparse.apply_flat_to (one scatter per dtype
        run; per tensor from the same views only where a target cannot be addressed flat); an update
        without the flat marker is the encoded per-tensor stream described by ``metas``."""
        if ipc.staging is not None:
            self.staging.ensure(ipc.staging)
        self.mapping.wait_ready()
        if ipc.fmt == IPC_FLAT:
            staged = self.staging.flat(ipc.staging_id, ipc.flat or [])
            try:
                with torch.no_grad():
                    out = apply_flat_to(targets, staged)
            except ValueError as e:
                raise IpcError(f"cuda_ipc sparse: {e}") from e
            _sync(self.device)
            return int(out["elements"])
        with torch.no_grad():  # the encoded stream (ipc_sparse staging layout): decode, check, scatter
            patches = self.staging.patches(ipc.staging_id, list(metas))
            live = [p for p in patches if p.count]
            if live and not in_range(live, [targets[p.name].numel() for p in live]):
                raise IpcError("cuda_ipc sparse: an index is out of range; nothing was applied")
            apply_patches(targets, live)
        _sync(self.device)
        return sum(p.count for p in live)

    def close(self) -> None:
        self.mapping.close()
        self.staging.close()
        gc.collect()
        if self.device.type == "cuda" and torch.cuda.is_initialized():
            torch.cuda.ipc_collect()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
