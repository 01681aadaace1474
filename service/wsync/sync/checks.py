"""Submit-time checks for a sync, written once: the API handler runs them when the request arrives
(answering 4xx at once) and the job runs them again when it starts (the fleet may have moved while
it was queued).

At submit, the checks that depend on the engines' or trainer's weights (baseline match, patch held,
delta snapshot) run only when nothing queued could still move them (``settled=True``); at start they
always run."""

from __future__ import annotations

from dataclasses import dataclass

from wsync.errors import Conflict, NotFound
from wsync.schemas import PatchInfo

from .records import EngineRecord
from .registry import Fleet


@dataclass
class SyncOrder:
    """What a sync job was asked to do (from SyncDense / SyncSparse)."""

    mode: str  # "dense" | "sparse"
    engine_ids: list[str]
    bucket_bytes: int | None = None
    patch_id: str | None = None
    encoding: str = "flat_int32"
    verify: bool = True
    delta: bool = False
    all_or_nothing: bool = False


@dataclass
class Checked:
    recs: list[EngineRecord]
    patch: PatchInfo | None = None
    delta_base: str | None = None  # the engines' common version a delta diffs against


def check_sync(fleet: Fleet, order: SyncOrder, *, settled: bool = True) -> Checked:
    """Trainer loaded, engines ready, patch exists (and, when ``settled``, held by the trainer and
    applying on top of what the engines serve), delta snapshot kept. Raises 404/409/422 naming the field."""
    fleet.trainer.require()
    recs = fleet.ready_engines(order.engine_ids)
    out = Checked(recs)
    if order.mode == "sparse":
        check_quarantine(recs)
    if order.patch_id is not None:
        out.patch = fleet.store.get_patch(order.patch_id)
        if out.patch is None:
            raise NotFound(f"no patch {order.patch_id!r}", field="patch_id")
        if settled:
            check_baseline(recs, out.patch.base_version)
            check_held(fleet, out.patch.id)
    elif order.delta and settled:
        out.delta_base = check_delta(fleet, recs)
    return out


def check_baseline(recs: list[EngineRecord], base_version: str | None) -> None:
    """A sparse patch is only correct on top of the weights it was computed from."""
    for rec in recs:
        if rec.info.version != base_version:
            raise Conflict(
                f"engine {rec.info.id} serves weights {rec.info.version!r} but the patch applies on top of "
                f"{base_version!r}; sync dense first", field="engine_ids", rule="baseline_match")


def check_quarantine(recs: list[EngineRecord]) -> None:
    """An engine a fault was blamed on gets no sparse sync until a dense reseed."""
    for i, rec in enumerate(recs):
        if rec.quarantined:
            raise Conflict(f"engine {rec.info.id} is quarantined ({rec.quarantined}); sync dense to reseed it",
                           field=f"engine_ids.{i}", rule="quarantined")


def check_held(fleet: Fleet, patch_id: str) -> None:
    if not fleet.trainer.holds(patch_id):
        raise Conflict(f"patch {patch_id} is not held by the trainer (it was reset or reloaded since, or the "
                       "patch is too old); prepare it again or sync dense", field="patch_id", rule="patch_held")


def check_delta(fleet: Fleet, recs: list[EngineRecord]) -> str:
    """The engines' common version, which the trainer must keep a snapshot of (else 409)."""
    versions = {r.info.version for r in recs}
    if len(versions) != 1 or None in versions:
        raise Conflict(f"a delta sync needs engines at one known version; they serve {sorted(map(str, versions))}",
                       field="engine_ids", rule="baseline_match")
    base = versions.pop()
    assert base is not None
    if base not in fleet.trainer.record.snapshots:
        raise Conflict(f"the trainer keeps no copy of version {base!r} to diff against; sync dense first",
                       field="delta", rule="snapshot_exists")
    return base
