"""The comparison job: dense vs sparse, end to end, each on a fresh engine (vLLM's rlhf_sparse_nccl.py
story): reset the trainer, launch an engine, generate, apply the same reference patch, sync it, generate
again, compare.

The comparison never touches the user's trainer state: a loaded trainer is stashed first (weights,
version, held patches, delta snapshots; wsync.sync.trainer.Trainer.stash) and given back afterwards,
whatever happened, so a step taken before ``compare`` can still be delta-synced after it."""

from __future__ import annotations

from wsync.jobs.runner import JobContext
from wsync.schemas import (
    ComparisonCreate,
    ComparisonReport,
    EngineLaunch,
    EngineState,
    PatchKind,
    PatchPrepare,
    PhaseReport,
    Verdicts,
)

from .checks import SyncOrder
from .registry import Fleet
from .run import run_sync


def run_comparison(fleet: Fleet, ctx: JobContext, req: ComparisonCreate) -> dict:
    model = fleet.trainer.resolve_model(req.model)
    saved = None
    if fleet.trainer.info.loaded:
        ctx.event(f"setting the trainer's state aside (version {fleet.trainer.version})")
        saved = fleet.trainer.stash()
    try:
        fleet.trainer.ensure(model)
        phases = {mode: _phase(fleet, ctx, req, model, mode) for mode in ("dense", "sparse")}
    finally:
        if saved is not None:
            fleet.trainer.unstash(saved)
            ctx.event(f"trainer state restored (version {fleet.trainer.version})")
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


def _token_ids(gens: list[dict]) -> list[list[int]]:
    return [g["token_ids"] for g in gens]


def _phase(fleet: Fleet, ctx: JobContext, req: ComparisonCreate, model: str, mode: str) -> PhaseReport:
    ctx.check_cancelled()
    ctx.event(f"{mode} phase: reset trainer, launch a fresh {req.engine_kind.value} engine")
    fleet.trainer.reset()
    engine = fleet.launch_engine(EngineLaunch(kind=req.engine_kind, model=model, name=f"{ctx.job_id}-{mode}",
                                              gpu_memory_utilization=req.gpu_memory_utilization))
    try:
        if engine.state != EngineState.ready:
            raise RuntimeError(f"{mode} engine failed to start: {engine.error}")
        trainer_before = _token_ids(fleet.trainer.generate(req.prompts, req.max_new_tokens))
        before = _token_ids(fleet.generate(engine.id, req.prompts, req.max_new_tokens))
        ctx.check_cancelled()
        patch = fleet.trainer.prepare_patch(PatchPrepare(kind=PatchKind.reference, prompts=req.prompts, rows=req.rows))
        order = SyncOrder(mode=mode, engine_ids=[engine.id], patch_id=patch.id if mode == "sparse" else None)
        sync = run_sync(fleet, ctx, order)
        after = _token_ids(fleet.generate(engine.id, req.prompts, req.max_new_tokens))
        trainer_after = _token_ids(fleet.trainer.generate(req.prompts, req.max_new_tokens))
    finally:
        if not req.keep_engines:
            fleet.delete_engine(engine.id)
    return PhaseReport(engine_id=engine.id, trainer_before=trainer_before, before=before, after=after,
                       trainer_after=trainer_after, selected_token_ids=patch.selected_token_ids or [],
                       patch_digest=patch.digest, payload_bytes=sync["payload_bytes"], wire_bytes=sync["wire_bytes"],
                       send_ms=sync["send_ms"], total_ms=sync["total_ms"], verified=sync["verified"],
                       transport=(sync.get("engines") or [{}])[0].get("transport"))
