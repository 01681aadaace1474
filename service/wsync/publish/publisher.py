"""`Publisher`: the trainer-side core that puts a model's weights on the engines (torch only).

Two steps per publish, so the receivers can be told what comes before a byte moves:
``plan = pub.prepare(mode, ...)`` decides dense or sparse (and diffs, for auto), then
``report = pub.send(group, plan)`` sends it as rank 0 of a wsync `SyncGroup` and records the new
baseline. ``dense`` / ``sparse`` / ``auto`` do both, calling ``announce(plan)`` in between (where
the receivers learn the metas: the SDK posts them to the service, a test hands them to a thread).

Versions: each publish gets one (the caller's step number, or the last published + 1); it is what
the engines will report once they hold the weights. Baselines: after a publish the publisher keeps a
copy of what it sent under that version (one baseline, on ``baseline_device`` or the weights'
device); ``auto`` diffs the live weights bit-exactly against the baseline of the version the engines
hold and falls back to dense, saying why in ``plan.fallback``, when it holds none, or when the sparse
stream would cost at least ``DENSE_FRACTION`` of the dense bytes. It never sends a patch computed
against a version other than the one the engines report.

Sharded (FSDP2) sources: every rank of the model must call prepare/send with the same arguments
(they gather); only rank 0 passes a group and sends; the mode is agreed by a broadcast on the
default process group. The live weights must not change between prepare and send.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from wsync.transfer.delta import Snapshot
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.group import SyncGroup
from wsync.transfer.meta import TensorMeta, TransferStats
from wsync.transfer.sparse import SparseMeta, SparsePatch, apply_patch, plan_sparse

from .names import NameHook
from .source import WeightSource, is_publishing_rank
from .wire import diff_source, send_patches, send_source_dense

__all__ = ["DENSE_FRACTION", "MODES", "Plan", "PublishError", "PublishReport", "Publisher"]

MODES = ("dense", "sparse", "auto")
#: auto sends dense when the sparse stream would be at least this fraction of the dense bytes.
DENSE_FRACTION = 0.9
DEFAULT_BUCKET_BYTES = 64 << 20


class PublishError(RuntimeError):
    pass


@dataclass
class Plan:
    """One publish, decided before any byte moves. ``to_dict`` is what the receivers need."""

    version: str
    mode: str  # dense | sparse: what goes on the wire
    requested: str  # dense | sparse | auto
    bucket_bytes: int
    dense_metas: list[TensorMeta]
    base_version: str | None = None
    sparse_metas: list[SparseMeta] | None = None
    fallback: str | None = None  # why a sparse/auto request goes dense
    patches: list[SparsePatch] = field(default_factory=list, repr=False)
    fingerprints: dict[str, str] = field(default_factory=dict, repr=False)
    live: bool = False  # the live weights equal base + patches (dense encoding may read them)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "mode": self.mode, "requested": self.requested,
                "base_version": self.base_version, "bucket_bytes": self.bucket_bytes, "fallback": self.fallback,
                "dense_metas": [m.to_dict() for m in self.dense_metas],
                "sparse_metas": [m.to_dict() for m in self.sparse_metas] if self.sparse_metas is not None else None}


@dataclass
class PublishReport:
    """What one publish sent: the service verifies the engines against ``fingerprints``."""

    version: str
    mode: str
    requested: str
    base_version: str | None
    fallback: str | None
    stats: TransferStats
    fingerprints: dict[str, str]
    tensors: int
    elements: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "mode": self.mode, "requested": self.requested,
                "base_version": self.base_version, "fallback": self.fallback, "stats": self.stats.to_dict(),
                "fingerprints": dict(self.fingerprints), "tensors": self.tensors, "elements": self.elements}


def _agree(value: Any) -> Any:
    """Rank 0's value on every rank of the default process group (a sharded model's ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Publisher:
    """Publishes one model's weights to engines (see the module docstring)."""

    def __init__(self, model: torch.nn.Module | Mapping[str, torch.Tensor], *, name_map: NameHook | None = None,
                 engine_metas: Sequence[TensorMeta] | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 keep_baseline: bool = True, baseline_device: str | torch.device | None = None,
                 encoding: str = "auto") -> None:
        self.source = WeightSource(model, name_map, engine_metas)
        self.bucket_bytes = int(bucket_bytes)
        self.keep_baseline = keep_baseline
        self.baseline_device = torch.device(baseline_device) if baseline_device is not None else None
        self.encoding = encoding
        self.baselines = Snapshot()
        self.version: str | None = None  # the last version sent

    # ---- versions ------------------------------------------------------------------------------
    def next_version(self, version: int | str | None = None) -> str:
        """The caller's version (e.g. its step number), else the last published integer + 1 (from 1)."""
        if version is not None:
            return str(version)
        try:
            return str(int(self.version) + 1) if self.version is not None else "1"
        except ValueError:
            raise PublishError(f"the last version {self.version!r} is not an integer; pass version=") from None

    def metas(self) -> list[TensorMeta]:
        return self.source.metas()

    # ---- planning ------------------------------------------------------------------------------
    def prepare(self, mode: str, *, version: int | str | None = None, engine_version: str | None = None,
                patches: Sequence[SparsePatch] | None = None, base_version: str | None = None) -> Plan:
        """Decide what goes on the wire. ``auto``: diff against ``engine_version``'s baseline. ``sparse``:
        the caller's ``patches`` (checkpoint names), which must turn ``base_version`` (default
        ``engine_version``) into the live weights."""
        if mode not in MODES:
            raise PublishError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        ver = self.next_version(version)
        plan = Plan(ver, "dense", mode, self.bucket_bytes, self.source.metas())
        if mode == "dense":
            return plan
        if mode == "sparse":
            if patches is None:
                raise PublishError("sparse needs patches")
            return self._plan_sparse(plan, list(patches), base_version or engine_version, live=True)
        held = engine_version is not None and engine_version in self.baselines
        if not _agree(held):
            plan.fallback = (f"no baseline of the engines' version {engine_version!r} (held: "
                             f"{self.baselines.keys() or 'none'})" if is_publishing_rank() else "rank 0 chose dense")
            return plan
        found, fps = diff_source(self.baselines, engine_version, self.source, self.bucket_bytes, True)
        plan.fingerprints = fps
        self._plan_sparse(plan, found, engine_version, live=not self.source.sharded)
        go_dense = None
        if is_publishing_rank():
            dense_bytes = sum(m.nbytes for m in plan.dense_metas)
            sparse_bytes = sum(m.nbytes for m in plan.sparse_metas or [])
            if dense_bytes and sparse_bytes >= DENSE_FRACTION * dense_bytes:
                go_dense = f"sparse would send {sparse_bytes} of {dense_bytes} dense bytes"
        go_dense = _agree(go_dense)
        if go_dense:
            plan.mode, plan.sparse_metas, plan.patches, plan.fallback = "dense", None, [], go_dense
        return plan

    def _plan_sparse(self, plan: Plan, patches: list[SparsePatch], base: str | None, live: bool) -> Plan:
        plan.mode, plan.base_version, plan.patches, plan.live = "sparse", base, patches, live
        specs = {m.name: m for m in plan.dense_metas}
        params = self.source.local() if live and not self.source.sharded else None
        plan.sparse_metas = plan_sparse(patches, specs, self.encoding, params)
        if not plan.fingerprints and is_publishing_rank():
            plan.fingerprints = self._expected(patches, base, params)
        return plan

    def _expected(self, patches: list[SparsePatch], base: str | None,
                  live: Mapping[str, torch.Tensor] | None) -> dict[str, str]:
        """Fingerprints the engines must show for the patched tensors: baseline + patch when held,
        else the live tensors (the caller's patch brought its model there)."""
        if base is not None and base in self.baselines:
            held = self.baselines.get(base)
            out = {}
            for p in patches:
                t = held[p.name].clone()
                apply_patch(t, p.to(t.device))
                out[p.name] = fingerprint([(p.name, t)])[p.name]
            return out
        return fingerprint((p.name, live[p.name]) for p in patches) if live is not None else {}

    # ---- sending -------------------------------------------------------------------------------
    def send(self, group: SyncGroup | None, plan: Plan) -> PublishReport:
        """Send ``plan`` as rank 0 of ``group`` (None on a sharded model's other ranks: they only
        gather) and keep the baseline of ``plan.version``."""
        if group is not None and group.rank != 0:
            raise PublishError(f"the publisher must be rank 0 of its group, not {group.rank}")
        n = len(plan.dense_metas)
        if plan.mode == "dense":
            kept: dict[str, torch.Tensor] | None = {} if self.keep_baseline else None
            stats, fps = send_source_dense(group, self.source, plan.bucket_bytes, True, kept)
            self._keep_dense(plan.version, kept)
            report = PublishReport(plan.version, "dense", plan.requested, None, plan.fallback, stats, fps, n,
                                   sum(m.numel for m in plan.dense_metas))
        else:
            stats = TransferStats()
            if group is not None:
                params = self.source.local() if plan.live else None
                stats = send_patches(group, plan.patches, plan.sparse_metas or [], params)
            self._keep_sparse(plan)
            report = PublishReport(plan.version, "sparse", plan.requested, plan.base_version, plan.fallback, stats,
                                   dict(plan.fingerprints), len(plan.patches), sum(p.count for p in plan.patches))
        self.version = plan.version
        return report

    def _keep_dense(self, version: str, kept: dict[str, torch.Tensor] | None) -> None:
        if kept is None or not is_publishing_rank():
            return
        for key in self.baselines.keys():
            self.baselines.drop(key)
        dev = self.baseline_device
        self.baselines.refresh(version, {n: t if dev is None else t.to(dev) for n, t in kept.items()})

    def _keep_sparse(self, plan: Plan) -> None:
        """Move the baseline forward by the patch (O(changed)); a baseline of another version is dropped."""
        base = plan.base_version
        if not self.keep_baseline or base is None or base not in self.baselines:
            for key in self.baselines.keys():
                self.baselines.drop(key)
            return
        dev = next(iter(self.baselines.get(base).values())).device
        self.baselines.update(base, [p.to(dev) for p in plan.patches])
        self.baselines.rename(base, plan.version)
        for key in self.baselines.keys():
            if key != plan.version:
                self.baselines.drop(key)

    # ---- one call each -------------------------------------------------------------------------
    def dense(self, group: SyncGroup | None, *, version: int | str | None = None,
              announce: Callable[[Plan], None] | None = None) -> PublishReport:
        return self._run(group, announce, self.prepare("dense", version=version))

    def sparse(self, group: SyncGroup | None, patches: Sequence[SparsePatch], *, version: int | str | None = None,
               base_version: str | None = None, announce: Callable[[Plan], None] | None = None) -> PublishReport:
        plan = self.prepare("sparse", version=version, patches=patches, base_version=base_version)
        return self._run(group, announce, plan)

    def auto(self, group: SyncGroup | None, engine_version: str | None, *, version: int | str | None = None,
             announce: Callable[[Plan], None] | None = None) -> PublishReport:
        return self._run(group, announce, self.prepare("auto", version=version, engine_version=engine_version))

    def _run(self, group: SyncGroup | None, announce: Callable[[Plan], None] | None, plan: Plan) -> PublishReport:
        if announce is not None and is_publishing_rank():
            announce(plan)
        return self.send(group, plan)
