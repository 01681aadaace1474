"""The run of one publish from an external trainer (wsync.sync.external): the engines leave their old
groups, pause, join the publisher's rendezvous as ranks 1..N (the publisher is rank 0 and hosts the
store), post their receives, and the job waits — bounded by Settings.publish_done_timeout_s and by the
publisher's lease — for every receive and the publisher's ``done``; then it verifies each engine's
fingerprints against the publisher's, sets versions, resumes and records a SyncReport like any sync.

Versions stay truthful: an engine serves ``order.version`` only once its fingerprints equal the
publisher's; after anything breaks (the publisher's error, its lease running out, no ``done`` in time,
an engine dying or failing its receive) every engine of the publish serves unknown weights
(``version = None``) and its side of the group is torn down; the job fails naming the cause."""

from __future__ import annotations

import time
from typing import Any

from wsync.actors.ref import ActorGone, CallTimeout, RemoteError
from wsync.engines.contract import DenseUpdate, SparseUpdate
from wsync.jobs.runner import JobContext
from wsync.schemas import EngineState, EngineSyncReport, SyncReport
from wsync.transfer.meta import TransferStats

from .calls import short
from .checks import check_baseline
from .external import PublisherError, PublishOrder
from .groups import TEARDOWN_TIMEOUT_S
from .records import EngineRecord
from .registry import Fleet

POLL_S = 0.05


class PublishFailed(RuntimeError):
    pass


def run_publish(fleet: Fleet, ctx: JobContext, order: PublishOrder) -> dict:
    """Run ``order``; returns the SyncReport as JSON (``transport``, ``requested``, ``fallback`` and
    ``trainer`` name the external side)."""
    t0 = time.perf_counter()
    try:
        recs = fleet.ready_engines(order.engine_ids)
        if order.mode == "sparse":
            check_baseline(recs, order.base_version)  # the fleet may have moved while the job was queued
    except Exception as exc:
        order.handle.fail(f"refused at start: {exc}")
        raise
    for rec in recs:  # an engine is in one group at a time: leave the trainer actor's, every side at once
        fleet.groups.drop_engine(rec.id)
    ctx.event(f"{order.mode} publish from {order.slot.name!r} to {len(recs)} engine(s) over "
              f"{order.transports[0].name}" + (f" ({order.fallback})" if order.fallback else ""))
    for rec in recs:
        fleet.set_engine(rec, state=EngineState.busy)
    try:
        sent, recvs = _transfer(fleet, ctx, order, recs)
        reports = _verify(fleet, order, recs, recvs)
    except BaseException as exc:
        for rec in recs:
            rec.info.version = None  # what the engines hold is unknown now: sparse is refused until dense
        order.handle.fail(f"the publish failed: {exc}")
        if isinstance(exc, (PublisherError, PublishFailed)):
            raise
        raise PublishFailed(short(exc)) from exc
    finally:
        _teardown(fleet, recs)
        order.slot.publishes.pop(order.job_id, None)
    verified = all(r.fingerprint_equal for r in reports) if reports and order.handle.done.result().get(
        "fingerprints") else None
    if verified:
        order.slot.version = order.version
    report = _report(fleet, order, sent, reports, (time.perf_counter() - t0) * 1e3, verified)
    ctx.event(f"{order.mode} publish done", verified=verified, total_ms=report.total_ms)
    return report.model_dump(mode="json")


def _transfer(fleet: Fleet, ctx: JobContext, order: PublishOrder,
              recs: list[EngineRecord]) -> tuple[TransferStats, list]:
    timeout = fleet.settings.group_timeout_s
    _each(fleet, recs, "pause")
    transport = order.transports[0]
    transport.open(order.handle, order.rendezvous, timeout)  # the publisher opens rank 0 by itself
    for rec, _tr in zip(recs, order.transports):
        rec.group = order.rendezvous["name"]
    joins = {r.id: r.actor.call("join_group", order.rendezvous, i + 1, t.name, timeout)
             for i, (r, t) in enumerate(zip(recs, order.transports))}
    _await(fleet, order, joins, "join the publisher's group")
    ctx.event(f"{len(recs)} engine(s) joined the publisher's group")
    dense = DenseUpdate(metas=order.slot.metas, bucket_bytes=order.bucket_bytes)
    _each(fleet, recs, "prepare_sync", dense)
    if order.mode == "dense":
        sent = transport.send_dense(order.handle, order.rendezvous["name"], dense)
        pending = {r.id: r.actor.call("recv_dense", dense) for r in recs}
    else:
        metas = order.sparse_metas or []
        sent = transport.send_sparse(order.handle, order.rendezvous["name"], order.job_id, metas)
        pending = {r.id: r.actor.call("recv_sparse", SparseUpdate(metas=metas)) for r in recs}
    recvs = _await(fleet, order, pending, "receive", until_done=True)
    return sent.result(), [recvs[r.id] for r in recs]


def _each(fleet: Fleet, recs: list[EngineRecord], method: str, *args: Any) -> list:
    """``method`` on every engine at once; a failure names the engine."""
    pending = [(r.id, r.actor.call(method, *args)) for r in recs]
    out = []
    for eid, ref in pending:
        try:
            out.append(fleet.caller.wait([ref])[0])
        except ActorGone as exc:
            raise PublishFailed(f"engine {eid} died during the publish ({method}): {short(exc)}") from None
        except (RemoteError, CallTimeout) as exc:
            raise PublishFailed(f"engine {eid} failed to {method}: {short(exc)}") from None
    return out


def _await(fleet: Fleet, order: PublishOrder, pending: dict[str, Any], what: str, until_done: bool = False) -> dict:
    """Every engine's call, polled with the publisher's state: an engine failing or dying fails the
    publish naming it; the publisher's error, its lost lease or no ``done`` within the bound fail it
    naming that. ``until_done``: also wait for the publisher's ``done``."""
    deadline = time.monotonic() + fleet.settings.publish_done_timeout_s
    out: dict[str, Any] = {}
    reported_error_at: float | None = None
    while True:
        for eid, ref in list(pending.items()):
            try:
                out[eid] = fleet.caller.wait([ref], POLL_S)[0]
                del pending[eid]
            except CallTimeout:
                continue
            except ActorGone as exc:
                raise PublishFailed(f"engine {eid} died during the publish ({what}): {short(exc)}") from None
            except RemoteError as exc:
                raise PublishFailed(f"engine {eid} failed to {what}: {short(exc)}") from None
        done = order.handle.done
        if done.done() and done.exception() is not None:
            # give the engines a moment to say whether one of them broke the transfer
            reported_error_at = reported_error_at or time.monotonic()
            if not pending or time.monotonic() - reported_error_at > 5.0:
                raise done.exception()  # type: ignore[misc]
        elif not pending and (not until_done or done.done()):
            return out
        lost = order.slot.lost()
        if lost is not None:
            raise PublisherError(lost)
        if time.monotonic() > deadline:
            raise PublisherError(f"publisher {order.slot.name!r} did not report done within "
                                 f"{fleet.settings.publish_done_timeout_s:g} s (engines still waiting to {what}: "
                                 f"{sorted(pending) or 'none'})")
        if not pending:
            time.sleep(POLL_S)


def _verify(fleet: Fleet, order: PublishOrder, recs: list[EngineRecord], recvs: list) -> list[EngineSyncReport]:
    """Each engine's fingerprints against the publisher's; the verified ones serve ``order.version``."""
    want: dict[str, str] = order.handle.done.result().get("fingerprints") or {}
    got = fleet.caller.wait([r.actor.call("fingerprint", list(want)) for r in recs]) if want else [{} for _ in recs]
    reports = []
    for rec, recv, fp, transport in zip(recs, recvs, got, order.transports):
        equal = (fp == want) if want else None
        rec.info.version = order.version if equal or not want else None
        rec.info.syncs += 1
        reports.append(EngineSyncReport(engine_id=rec.id, recv_ms=recv.recv_ms, version=order.version,
                                        kind=rec.info.kind.value, transport=transport.name,
                                        fingerprint_equal=equal))
    return reports


def _teardown(fleet: Fleet, recs: list[EngineRecord]) -> None:
    """Every engine leaves the publisher's group (the publisher closes its own side) and resumes."""
    for rec in recs:
        rec.group = None
    bound = min(TEARDOWN_TIMEOUT_S, fleet.settings.group_timeout_s + 5)
    fleet.caller.best_effort([r.actor.call("leave_group") for r in recs], bound)
    fleet.caller.best_effort([r.actor.call("resume") for r in recs], bound)
    for rec in recs:
        if rec.info.state == EngineState.busy:
            fleet.set_engine(rec, state=EngineState.ready)


def _report(fleet: Fleet, order: PublishOrder, sent: TransferStats, reports: list[EngineSyncReport],
            total_ms: float, verified: bool | None) -> SyncReport:
    body = order.handle.done.result()
    num_params = sum(m.numel for m in order.slot.metas)
    sparse = order.mode == "sparse"
    return SyncReport(
        mode=order.mode, engine_ids=order.engine_ids, payload_bytes=sent.bytes, wire_bytes=sent.wire_bytes,
        send_ms=sent.ms, total_ms=total_ms, tensors=int(body.get("tensors") or len(order.slot.metas)),
        version=order.version, encoding=(order.sparse_metas[0].encoding if sparse and order.sparse_metas else None),
        verified=verified, engines=reports, messages=sent.messages, zero_copy=sent.zero_copy,
        changed_fraction=(int(body.get("elements") or 0) / max(1, num_params)) if sparse else None,
        transport=order.transports[0].name, requested=order.requested, fallback=order.fallback,
        trainer=order.slot.name, publisher_ms=body.get("total_ms"))
