"""Sync and comparison jobs: what runs in the background once POST answered 202."""

from __future__ import annotations

import time
from collections import defaultdict

import ray

from wsync.errors import Conflict
from wsync.fleet import EngineRecord, Fleet
from wsync.jobs.runner import JobContext
from wsync.schemas import (
    ComparisonCreate, ComparisonReport, EngineLaunch, EngineState, EngineSyncReport, PatchKind, PatchPrepare,
    PhaseReport, SyncReport, Verdicts,
)


def check_sparse_baseline(fleet: Fleet, recs: list[EngineRecord], base_version: str) -> None:
    """A sparse patch is only correct on top of the weights it was computed from."""
    for rec in recs:
        if rec.info.version != base_version:
            raise Conflict(
                f"engine {rec.info.id} serves weights {rec.info.version!r} but the patch applies on top of "
                f"{base_version!r}; sync dense first", field="engine_ids", rule="baseline_match")


def run_sync(fleet: Fleet, ctx: JobContext, mode: str, engine_ids: list[str], *, bucket_bytes: int | None = None,
             patch_id: str | None = None, encoding: str = "flat_int32", verify: bool = True,
             delta: bool = False) -> dict:
    t0 = time.perf_counter()
    recs = fleet.ready_engines(engine_ids)
    version, patch = fleet.trainer_info.get("version"), None
    if delta:
        ctx.event("diffing the trainer's weights against the engines' version")
        patch = fleet.prepare_delta(recs)
        patch_id = patch.id
        ctx.event("delta ready", elements=patch.num_elements, diff_ms=patch.diff_ms, diff_gbps=patch.diff_gbps)
    elif mode == "sparse":
        patch = fleet.store.get_patch(patch_id)
        check_sparse_baseline(fleet, recs, patch.base_version)
    if patch is not None:
        version = patch.target_version or patch.id
    bucket = bucket_bytes or fleet.settings.dense_bucket_bytes
    by_kind: dict[tuple[str, str], list[EngineRecord]] = defaultdict(list)
    for rec in recs:
        by_kind[(rec.info.kind.value, sync_protocol(rec))].append(rec)
    sends, engine_reports = [], []
    for rec in recs:
        rec.info.state = EngineState.busy
    try:
        for (kind, protocol), group in by_kind.items():
            ctx.event(f"{mode} sync to {len(group)} {kind} engine(s) over the {protocol} wire")
            send, recvs = _sync_group(fleet, ctx, kind, protocol, group, mode, bucket, patch_id, encoding)
            sends.append(send)
            for rec, recv in zip(group, recvs):
                rec.info.version, rec.info.syncs = version, rec.info.syncs + 1
                engine_reports.append(EngineSyncReport(engine_id=rec.info.id, recv_ms=recv["recv_ms"], version=version))
    except BaseException:
        for rec in recs:  # the engines' weights are now unknown: refuse sparse until a dense reseed
            rec.info.version = None
        raise
    finally:
        for rec in recs:
            if rec.info.state == EngineState.busy:
                rec.info.state = EngineState.ready
    total_ms = (time.perf_counter() - t0) * 1e3  # every engine serves the new weights now
    fleet.synced(version, patch)
    # Fingerprints only mean something when the engines should now equal the trainer (a sparse sync of
    # an older patch leaves them at that patch's version, behind a trainer that has moved on).
    comparable = verify and version == fleet.trainer_info.get("version")
    # A delta claims the engines now equal the trainer everywhere: check every tensor then.
    touched = [t.name for t in patch.tensors] if patch is not None and not delta else None
    verified = _verify(fleet, recs, engine_reports, touched) if comparable else None
    report = SyncReport(
        mode=mode, engine_ids=engine_ids, payload_bytes=max(s["bytes"] for s in sends),
        wire_bytes=sum(s["wire_bytes"] for s in sends), send_ms=sum(s["send_ms"] for s in sends),
        total_ms=total_ms, tensors=_tensor_count(fleet, mode, patch_id), version=version,
        patch_id=patch_id, encoding=encoding if mode == "sparse" else None, verified=verified, engines=engine_reports,
        diff_ms=patch.diff_ms if patch else None, diff_gbps=patch.diff_gbps if patch else None,
        changed_fraction=patch.num_elements / max(1, fleet.trainer_info.get("num_params", 0)) if patch else None,
        messages=sum(s.get("messages", 0) for s in sends), zero_copy=sum(s.get("zero_copy", 0) for s in sends))
    ctx.event(f"{mode} sync done", send_ms=report.send_ms, total_ms=report.total_ms)
    return report.model_dump(mode="json")


def sync_protocol(rec: EngineRecord) -> str:
    """"wsync" (wsync.transfer's wire: reference engines, and vLLM engines on the direct route) or "vllm"
    (vLLM's own weight-transfer API and wire: flat_int32 sparse only)."""
    default = "vllm" if rec.info.kind.value == "vllm" else "wsync"
    return str((rec.info.details or {}).get("sync_protocol") or default)


def _sync_group(fleet: Fleet, ctx: JobContext, kind: str, protocol: str, recs: list[EngineRecord], mode: str,
                bucket: int, patch_id: str | None, encoding: str) -> tuple[dict, list[dict]]:
    trainer, handles, timeout = fleet.trainer, [r.handle for r in recs], fleet.timeout()
    vllm = protocol == "vllm"
    name = _link(fleet, ctx, kind, protocol, recs)
    try:
        ray.get([h.pause.remote() for h in handles], timeout=timeout)
        direct = kind == "vllm" and not vllm
        dense_metas = ray.get(trainer.dense_metas.remote(), timeout=timeout) if mode == "dense" or direct else None
        if direct:  # the engines' maps are ready before any byte moves
            ray.get([h.prepare_sync.remote(dense_metas, bucket) for h in handles], timeout=timeout)
        if mode == "dense":
            update = {"metas": dense_metas, "bucket_bytes": bucket, "packed": False}
            send = trainer.send_dense_vllm.remote(name, False) if vllm else trainer.send_dense.remote(name, bucket)
            recvs = [h.recv_dense.remote(update) for h in handles]
        else:
            metas = ray.get(trainer.sparse_plan.remote(patch_id, "flat_int32" if vllm else encoding), timeout=timeout)
            send = (trainer.send_sparse_vllm.remote(name, patch_id) if vllm
                    else trainer.send_sparse.remote(name, patch_id, metas))
            recvs = [h.recv_sparse.remote({"metas": metas}) for h in handles]
        out = ray.get([send, *recvs], timeout=timeout)
    except BaseException:
        # A broken transfer leaves the group in an unknown state: tear it down on every side.
        _unlink(fleet, recs, name)
        raise
    finally:
        _best_effort([h.resume.remote() for h in handles])
    return out[0], out[1:]


def _link(fleet: Fleet, ctx: JobContext, kind: str, protocol: str, recs: list[EngineRecord]) -> str:
    """The open transfer group for exactly these engines (in rank order), opened if needed."""
    key = (kind, protocol, *(r.info.id for r in recs))
    name = fleet.links.get(key)
    if name is not None and all(r.link == name for r in recs):
        return name
    if name is not None:
        _unlink(fleet, recs, name)
    for rec in recs:  # an engine is in one group at a time: its old groups go
        if rec.link is not None:
            fleet.drop_links(rec.info.id)
    name = f"wsync-{ctx.job_id}-{kind}-{protocol}"
    ctx.event(f"opening a {kind} transfer group for {len(recs)} engine(s)")
    trainer, timeout = fleet.trainer, fleet.timeout()
    rdv = ray.get(trainer.rendezvous.remote(1 + len(recs), name), timeout=timeout)
    opener = trainer.open_vllm_group if protocol == "vllm" else trainer.open_group
    try:
        ray.get([opener.remote(rdv)] + [r.handle.join_group.remote(rdv, i + 1) for i, r in enumerate(recs)],
                timeout=timeout)
    except BaseException:
        _unlink(fleet, recs, name)
        raise
    fleet.links[key] = name
    for rec in recs:
        rec.link = name
    return name


def _unlink(fleet: Fleet, recs: list[EngineRecord], name: str) -> None:
    fleet.links = {k: v for k, v in fleet.links.items() if v != name}
    for rec in recs:
        rec.link = None
    _best_effort([fleet.trainer.close_group.remote(name)] + [r.handle.leave_group.remote() for r in recs])


def _verify(fleet: Fleet, recs: list[EngineRecord], reports: list[EngineSyncReport], names: list[str] | None) -> bool:
    """Exact weight fingerprints, engine vs trainer, over ``names`` (None: all) both sides name alike."""
    want = ray.get(fleet.trainer.fingerprint.remote(names), timeout=fleet.timeout())
    got = ray.get([r.handle.fingerprint.remote(names) for r in recs], timeout=fleet.timeout())
    ok_all = True
    for report, fp in zip(reports, got):
        common = [n for n in fp if n in want]
        report.fingerprint_equal = bool(common) and all(fp[n] == want[n] for n in common)
        ok_all &= report.fingerprint_equal
    return ok_all


def _tensor_count(fleet: Fleet, mode: str, patch_id: str | None) -> int:
    if mode == "sparse":
        return len(fleet.store.get_patch(patch_id).tensors)
    return int(fleet.trainer_info.get("num_tensors", 0))


def _best_effort(refs) -> None:
    try:
        ray.get(refs, timeout=60)
    except Exception:
        pass


# ---- the comparison: vLLM's rlhf_sparse_nccl.py story as a job ---------------------------------
def run_comparison(fleet: Fleet, ctx: JobContext, req: ComparisonCreate) -> dict:
    model = fleet.resolve_model(req.model)
    fleet.ensure_trainer(model)
    phases = {mode: _phase(fleet, ctx, req, model, mode) for mode in ("dense", "sparse")}
    dense, sparse = phases["dense"], phases["sparse"]
    verdicts = Verdicts(
        baseline_equal=dense.before == sparse.before,
        patch_selection_equal=dense.selected_token_ids == sparse.selected_token_ids,
        patch_digest_equal=dense.patch_digest == sparse.patch_digest,
        after_equal=dense.after == sparse.after,
        any_output_changed=any(b != a for b, a in zip(dense.before, dense.after)),
    )
    report = ComparisonReport(
        ok=all(verdicts.model_dump().values()), model=model, engine_kind=req.engine_kind, prompts=req.prompts,
        verdicts=verdicts,
        trainer_engine_baseline_equal=dense.before == dense.trainer_before and sparse.before == sparse.trainer_before,
        dense_payload_mb=dense.payload_bytes / 2**20, sparse_payload_mb=sparse.payload_bytes / 2**20,
        dense_send_ms=dense.send_ms, sparse_send_ms=sparse.send_ms, dense=dense, sparse=sparse)
    return report.model_dump(mode="json")


def _phase(fleet: Fleet, ctx: JobContext, req: ComparisonCreate, model: str, mode: str) -> PhaseReport:
    ctx.check_cancelled()
    ctx.event(f"{mode} phase: reset trainer, launch a fresh {req.engine_kind.value} engine")
    fleet.reset_trainer()
    engine = fleet.launch_engine(EngineLaunch(kind=req.engine_kind, model=model, name=f"{ctx.job_id}-{mode}",
                                              gpu_memory_utilization=req.gpu_memory_utilization))
    try:
        if engine.state != EngineState.ready:
            raise RuntimeError(f"{mode} engine failed to start: {engine.error}")
        ids = lambda gens: [g["token_ids"] for g in gens]  # noqa: E731
        trainer_before = ids(ray.get(fleet.trainer.generate.remote(req.prompts, req.max_new_tokens)))
        before = ids(fleet.generate(engine.id, req.prompts, req.max_new_tokens))
        ctx.check_cancelled()
        patch = fleet.prepare_patch(PatchPrepare(kind=PatchKind.reference, prompts=req.prompts, rows=req.rows))
        sync = run_sync(fleet, ctx, mode, [engine.id], patch_id=patch.id if mode == "sparse" else None)
        after = ids(fleet.generate(engine.id, req.prompts, req.max_new_tokens))
        trainer_after = ids(ray.get(fleet.trainer.generate.remote(req.prompts, req.max_new_tokens)))
    finally:
        if not req.keep_engines:
            fleet.delete_engine(engine.id)
    payload = sync["payload_bytes"]
    return PhaseReport(engine_id=engine.id, trainer_before=trainer_before, before=before, after=after,
                       trainer_after=trainer_after, selected_token_ids=patch.selected_token_ids or [],
                       patch_digest=patch.digest, payload_bytes=payload, wire_bytes=sync["wire_bytes"],
                       send_ms=sync["send_ms"], total_ms=sync["total_ms"], verified=sync["verified"])
