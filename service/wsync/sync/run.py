"""The run of one sync job: checks (again, at start), delta preparation, the transfer per partition
of engines (same kind, same transport) over its transfer group, versions, snapshots, verification,
the report.

Versions stay truthful: when any transfer breaks, every engine of the sync serves unknown weights
(``version = None``: sparse and delta are refused until a dense reseed) and the broken group is torn
down on every side."""

from __future__ import annotations

import time
from collections import defaultdict

from wsync.engines.contract import DenseUpdate, ReceiveReport
from wsync.jobs.runner import JobContext
from wsync.schemas import EngineState, EngineSyncReport, PatchInfo, SyncReport
from wsync.transfer.meta import TransferStats

from .checks import SyncOrder, check_sync
from .records import EngineRecord
from .registry import Fleet
from .transports import Transport


def run_sync(fleet: Fleet, ctx: JobContext, order: SyncOrder) -> dict:
    """Run ``order``; returns the SyncReport as JSON. Cancellation is honoured before any byte moves."""
    t0 = time.perf_counter()
    checked = check_sync(fleet, order)
    patch = checked.patch
    if order.delta:
        ctx.event("diffing the trainer's weights against the engines' version")
        patch = fleet.trainer.prepare_delta(checked.delta_base)  # type: ignore[arg-type]
        ctx.event("delta ready", elements=patch.num_elements, diff_ms=patch.diff_ms, diff_gbps=patch.diff_gbps)
    ctx.check_cancelled()  # the safe point: nothing has moved yet
    version = (patch.target_version or patch.id) if patch is not None else fleet.trainer.version
    assert version is not None
    bucket = order.bucket_bytes or fleet.settings.dense_bucket_bytes
    sends, reports = _transfer(fleet, ctx, checked.recs, order, bucket, patch, version)
    total_ms = (time.perf_counter() - t0) * 1e3  # every engine serves the new weights now
    fleet.trainer.mark_synced(version, patch, fleet.serving_versions())
    # Fingerprints only mean something when the engines should now equal the trainer (a sparse sync of
    # an older patch leaves them at that patch's version, behind a trainer that has moved on).
    comparable = order.verify and version == fleet.trainer.version
    # A delta claims the engines now equal the trainer everywhere: check every tensor then.
    touched = [t.name for t in patch.tensors] if patch is not None and not order.delta else None
    verified = verify(fleet, checked.recs, reports, touched) if comparable else None
    report = _report(fleet, order, patch, version, sends, reports, total_ms, verified)
    ctx.event(f"{order.mode} sync done", send_ms=report.send_ms, total_ms=report.total_ms)
    return report.model_dump(mode="json")


def _transfer(fleet: Fleet, ctx: JobContext, recs: list[EngineRecord], order: SyncOrder, bucket: int,
              patch: PatchInfo | None, version: str) -> tuple[list[TransferStats], list[EngineSyncReport]]:
    """Every partition in turn; engines are busy meanwhile; any failure leaves all versions unknown."""
    parts: dict[tuple[str, str], list[EngineRecord]] = defaultdict(list)
    for rec in recs:
        assert rec.transport is not None, f"engine {rec.id} is ready without a transport"
        parts[(rec.info.kind.value, rec.transport.name)].append(rec)
    sends: list[TransferStats] = []
    reports: list[EngineSyncReport] = []
    for rec in recs:
        fleet.set_engine(rec, state=EngineState.busy)
    try:
        for (kind, transport), group in parts.items():
            ctx.event(f"{order.mode} sync to {len(group)} {kind} engine(s) over the {transport} transport")
            send, recvs = _sync_partition(fleet, ctx, kind, group, order, bucket, patch)
            sends.append(send)
            for rec, recv in zip(group, recvs):
                rec.info.version, rec.info.syncs = version, rec.info.syncs + 1
                reports.append(EngineSyncReport(engine_id=rec.id, recv_ms=recv.recv_ms, version=version,
                                                kind=kind, transport=transport))
    except BaseException:
        for rec in recs:  # the engines' weights are now unknown: refuse sparse until a dense reseed
            rec.info.version = None
        raise
    finally:
        for rec in recs:
            fleet.set_engine(rec, state=EngineState.ready if rec.info.state == EngineState.busy else rec.info.state)
    return sends, reports


def _sync_partition(fleet: Fleet, ctx: JobContext, kind: str, recs: list[EngineRecord], order: SyncOrder,
                    bucket: int, patch: PatchInfo | None) -> tuple[TransferStats, list[ReceiveReport]]:
    """One transfer to engines sharing a transport: group, pause, prepare, send || receive, resume."""
    transport: Transport = recs[0].transport  # type: ignore[assignment]
    trainer, call = fleet.trainer.actor, fleet.caller
    assert trainer is not None
    name = fleet.groups.ensure(
        transport, recs, f"wsync-{ctx.job_id}-{kind}-{transport.name}", partition=kind,
        on_open=lambda: ctx.event(f"opening a {kind} transfer group for {len(recs)} engine(s)"))
    try:
        call.wait([r.actor.call("pause") for r in recs])
        dense = DenseUpdate(metas=fleet.trainer.record.params, bucket_bytes=bucket)
        call.wait([r.actor.call("prepare_sync", dense) for r in recs])  # maps and plans before any byte
        if order.mode == "dense":
            updates = transport.dense_updates(call, trainer, name, dense, len(recs))
            send = transport.send_dense(trainer, name, dense)
            recvs = [r.actor.call("recv_dense", u) for r, u in zip(recs, updates)]
        else:
            assert patch is not None
            plan = call.wait([trainer.call("sparse_plan", patch.id, transport.sparse_encoding(order.encoding))])[0]
            sparse = transport.sparse_updates(call, trainer, name, patch.id, plan, len(recs))
            send = transport.send_sparse(trainer, name, patch.id, plan)
            recvs = [r.actor.call("recv_sparse", u) for r, u in zip(recs, sparse)]
        out = call.wait([send, *recvs])
    except BaseException:
        fleet.groups.close_named(name)  # a broken transfer leaves the group unknown: every side goes
        raise
    finally:
        call.best_effort([r.actor.call("resume") for r in recs])
    return out[0], out[1:]


def verify(fleet: Fleet, recs: list[EngineRecord], reports: list[EngineSyncReport], names: list[str] | None) -> bool:
    """Exact weight fingerprints, engine vs trainer, over ``names`` (None: all) both sides name alike."""
    trainer = fleet.trainer.actor
    assert trainer is not None
    want = fleet.caller.wait([trainer.call("fingerprint", names)])[0]
    got = fleet.caller.wait([r.actor.call("fingerprint", names) for r in recs])
    ok_all = True
    for report, fp in zip(reports, got):
        common = [n for n in fp if n in want]
        report.fingerprint_equal = bool(common) and all(fp[n] == want[n] for n in common)
        ok_all &= report.fingerprint_equal
    return ok_all


def _report(fleet: Fleet, order: SyncOrder, patch: PatchInfo | None, version: str, sends: list[TransferStats],
            reports: list[EngineSyncReport], total_ms: float, verified: bool | None) -> SyncReport:
    info = fleet.trainer.info
    return SyncReport(
        mode=order.mode, engine_ids=order.engine_ids, payload_bytes=max(s.bytes for s in sends),
        wire_bytes=sum(s.wire_bytes for s in sends), send_ms=sum(s.ms for s in sends), total_ms=total_ms,
        tensors=len(patch.tensors) if order.mode == "sparse" and patch is not None else info.num_tensors,
        version=version, patch_id=patch.id if patch else None,
        encoding=order.encoding if order.mode == "sparse" else None, verified=verified, engines=reports,
        diff_ms=patch.diff_ms if patch else None, diff_gbps=patch.diff_gbps if patch else None,
        changed_fraction=patch.num_elements / max(1, info.num_params) if patch else None,
        messages=sum(s.messages for s in sends), zero_copy=sum(s.zero_copy for s in sends))
