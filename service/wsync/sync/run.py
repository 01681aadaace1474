"""The run of one sync job: checks (again, at start), delta preparation, the transfer per partition
of engines (same kind, same transport) over its transfer group, versions, snapshots, verification,
the report.

Versions stay truthful: an engine a broken transfer reached serves unknown weights (``version = None``:
sparse and delta are refused until a dense reseed) and the broken group is torn down on every side
(abort, on the actors' control lane). Every wait is bounded (Settings: group_timeout_s, call_timeout_s,
transfer_timeout_s, and sync_timeout_s for the whole job); a breach is a ``Fault`` naming the phase
and the peers to blame (sync/outcomes.py). The engines blamed are quarantined (state ``failed`` when
their actor is dead) and the rest of the partition is synced again without them, so one bad engine
never stops the others from committing; the job then fails naming the bad engines, and its events
carry every engine's outcome. ``all_or_nothing`` skips that retry."""

from __future__ import annotations

import time
from collections import defaultdict

from wsync.engines.contract import DenseUpdate, ReceiveReport
from wsync.jobs.runner import JobCancelled, JobContext
from wsync.schemas import EngineState, EngineSyncReport, PatchInfo, SyncReport
from wsync.transfer.meta import TransferStats

from .checks import SyncOrder, check_sync
from .outcomes import TRAINER, Deadline, Fault, blame, gather
from .records import EngineRecord
from .registry import Fleet
from .transports import Transport


def run_sync(fleet: Fleet, ctx: JobContext, order: SyncOrder) -> dict:
    """Run ``order``; returns the SyncReport as JSON. Cancellation is honoured before any byte moves."""
    t0 = time.perf_counter()
    deadline = Deadline(fleet.settings.sync_timeout_s)
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
    try:
        sends, reports, _ = _transfer(fleet, ctx, checked.recs, order, bucket, patch, version, deadline)
    except SyncIncomplete as exc:
        ctx.event("per-engine outcomes", engines=[r.model_dump(mode="json") for r in exc.done + exc.failed])
        if exc.done:  # the engines that committed serve this version: keep the trainer's snapshots right
            fleet.trainer.mark_synced(version, patch, fleet.serving_versions())
        raise
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
              patch: PatchInfo | None, version: str, deadline: Deadline
              ) -> tuple[list[TransferStats], list[EngineSyncReport], list[EngineSyncReport]]:
    """Every partition in turn; engines are busy meanwhile. Returns the sends, the committed engines'
    reports and the failed ones'. A partition whose phase breaks (``Fault``) drops the engines it blames
    (quarantined; state ``failed`` when the actor is dead) and runs once more on the rest, unless the
    trainer broke or ``all_or_nothing``. Engines a broken transfer reached serve unknown weights until
    they commit (a retry sends the same absolute values again: dense and sparse are idempotent)."""
    parts: dict[tuple[str, str], list[EngineRecord]] = defaultdict(list)
    for rec in recs:
        assert rec.transport is not None, f"engine {rec.id} is ready without a transport"
        parts[(rec.info.kind.value, rec.transport.name)].append(rec)
    sends: list[TransferStats] = []
    done: list[EngineSyncReport] = []
    failed: list[EngineSyncReport] = []
    last: Fault | None = None
    for rec in recs:
        fleet.set_engine(rec, state=EngineState.busy)
    try:
        for (kind, transport), group in parts.items():
            todo = list(group)
            for attempt in (1, 2):
                ctx.event(f"{order.mode} sync to {len(todo)} {kind} engine(s) over the {transport} transport"
                          + (" (again, without the failed engines)" if attempt > 1 else ""))
                try:
                    send, recvs = _sync_partition(fleet, ctx, kind, todo, order, bucket, patch, deadline)
                except Fault as fault:
                    last = fault
                    for rec in todo:
                        rec.info.version = None  # the transfer may have reached it: unknown until it commits
                    blamed = [r for r in todo if r.id in fault.causes]
                    for rec in blamed:
                        failed.append(_fail(rec, fault))
                    todo = [r for r in todo if r not in blamed]
                    ctx.event(str(fault), phase=fault.phase, causes=fault.causes)
                    if not todo or not blamed or TRAINER in fault.causes or order.all_or_nothing or attempt == 2:
                        for rec in todo:
                            failed.append(_fail(rec, fault, blamed=False))
                        raise SyncIncomplete(fault, done, failed) from None
                    continue
                sends.append(send)
                for rec, recv in zip(todo, recvs):
                    rec.info.version, rec.info.syncs = version, rec.info.syncs + 1
                    if order.mode == "dense":
                        rec.quarantined = None  # a dense reseed makes it trustworthy again
                    done.append(EngineSyncReport(engine_id=rec.id, recv_ms=recv.recv_ms, version=version,
                                                kind=kind, transport=transport))
                break
    except (SyncIncomplete, JobCancelled):
        raise  # versions already say what each engine serves (a cancel comes before any byte moved)
    except BaseException:
        for rec in recs:  # the engines' weights are now unknown: refuse sparse until a dense reseed
            rec.info.version = None
        raise
    finally:
        for rec in recs:
            fleet.set_engine(rec, state=EngineState.ready if rec.info.state == EngineState.busy else rec.info.state)
    if failed:
        raise SyncIncomplete(last, done, failed)
    return sends, done, failed


class SyncIncomplete(RuntimeError):
    """Some engines did not commit: the job fails naming them (phase, cause); the others' reports say
    what they serve now."""

    def __init__(self, fault: Fault | None, done: list[EngineSyncReport], failed: list[EngineSyncReport]):
        self.done, self.failed = done, failed
        head = str(fault) if fault is not None else "some engines failed"
        ok = ", ".join(f"{r.engine_id} committed {r.version}" for r in done)
        bad = ", ".join(f"{r.engine_id} {r.outcome} (version {r.version})" for r in failed)
        super().__init__(f"{head} | {bad}" + (f" | {ok}" if ok else ""))


def _fail(rec: EngineRecord, fault: Fault, blamed: bool = True) -> EngineSyncReport:
    """Record why an engine did not commit; a blamed engine is quarantined (and failed when dead)."""
    cause = fault.causes.get(rec.id) if blamed else f"not committed: {fault}"
    if blamed:
        rec.quarantined = f"{fault.phase}: {cause}"
        dead = rec.actor.gone()
        if dead:
            rec.info.state, rec.info.error = EngineState.failed, dead
    return EngineSyncReport(engine_id=rec.id, recv_ms=0.0, version=rec.info.version, outcome="failed",
                            cause=f"{fault.phase}: {cause}")


def _sync_partition(fleet: Fleet, ctx: JobContext, kind: str, recs: list[EngineRecord], order: SyncOrder,
                    bucket: int, patch: PatchInfo | None, deadline: Deadline
                    ) -> tuple[TransferStats, list[ReceiveReport]]:
    """One transfer to engines sharing a transport: group, pause, prepare, send || receive, resume.
    Each phase is bounded (settings) and within the job's deadline; a broken phase closes the group on
    every side (abort) and raises ``Fault`` naming the peers and the phase."""
    transport: Transport = recs[0].transport  # type: ignore[assignment]
    trainer, call, s = fleet.trainer.actor, fleet.caller, fleet.settings
    assert trainer is not None
    actors = {TRAINER: trainer, **{r.id: r.actor for r in recs}}
    deadline.check("open group")
    name = fleet.groups.ensure(
        transport, recs, f"wsync-{ctx.job_id}-{kind}-{transport.name}", partition=kind,
        on_open=lambda: ctx.event(f"opening a {kind} transfer group for {len(recs)} engine(s)"))
    abort = lambda: fleet.groups.close_named(name)  # noqa: E731 - the watchdog's action

    def phase(what: str, calls: list, cap: float) -> list:
        deadline.check(what)
        got = gather(call, calls, deadline.left(cap), on_break=abort)
        if got.broken:
            abort()
            raise Fault(what, blame(call, got, actors, cap, s.probe_timeout_s))
        return [got.ok[p] for p, _ in calls]

    try:
        phase("pause", [(r.id, r.actor.call("pause")) for r in recs], s.call_timeout_s)
        dense = DenseUpdate(metas=fleet.trainer.record.params, bucket_bytes=bucket)
        phase("prepare", [(r.id, r.actor.call("prepare_sync", dense)) for r in recs], s.call_timeout_s)
        ctx.check_cancelled()  # the last safe point: nothing has moved on this group yet
        if order.mode == "dense":
            updates = transport.dense_updates(call, trainer, name, dense, len(recs))
            send = transport.send_dense(trainer, name, dense)
            recvs = [(r.id, r.actor.call("recv_dense", u)) for r, u in zip(recs, updates)]
        else:
            assert patch is not None
            plan = phase("plan", [(TRAINER, trainer.call(
                "sparse_plan", patch.id, transport.sparse_encoding(order.encoding)))], s.call_timeout_s)[0]
            sparse = transport.sparse_updates(call, trainer, name, patch.id, plan, len(recs))
            send = transport.send_sparse(trainer, name, patch.id, plan)
            recvs = [(r.id, r.actor.call("recv_sparse", u)) for r, u in zip(recs, sparse)]
        out = phase("transfer", [(TRAINER, send), *recvs], s.transfer_timeout_s)
    except JobCancelled:
        raise  # before any byte moved: the group stays usable
    except BaseException:
        abort()  # a broken transfer leaves the group unknown: every side goes
        raise
    finally:
        live = [r for r in recs if not r.actor.gone()]
        call.best_effort([r.actor.call("resume") for r in live], s.probe_timeout_s)
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
