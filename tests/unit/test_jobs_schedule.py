"""Per-resource FIFO order of jobs: the scheduler alone, then the runner with plain functions (no Ray)."""

import random
import threading
import time

import pytest

from wsync.jobs.runner import JobCancelled, JobRunner
from wsync.jobs.schedule import FifoScheduler
from wsync.jobs.store import Store
from wsync.schemas import JobKind, JobState


def test_head_of_every_queue_runs_and_the_rest_waits():
    s = FifoScheduler()
    assert [j for j, _ in s.add("a", ["trainer", "engine:1"])] == ["a"]
    assert s.add("b", ["trainer", "engine:2"]) == []          # behind a on trainer
    assert [j for j, _ in s.add("c", ["engine:3"])] == ["c"]  # shares nothing: runs at once
    assert s.add("d", ["engine:2"]) == []                     # behind b on engine:2, although b is not running
    assert [j for j, _ in s.finish("a")] == ["b"]
    assert s.finish("b") == [("d", None)]
    assert s.pending(["engine:2"]) and not s.pending(["engine:1"])


def test_withdrawing_a_queued_job_lets_the_ones_behind_it_start():
    s = FifoScheduler()
    s.add("a", ["trainer"])
    s.add("b", ["trainer", "engine:1"])
    s.add("c", ["engine:1"])
    assert s.withdraw("a") == (False, [])       # running: cannot be withdrawn
    assert s.withdraw("b") == (True, [("c", None)])  # c waited on engine:1 behind b only
    assert s.is_started("c") and not s.is_started("b") and s.queued_ids() == ["a", "c"]


def test_no_deadlock_with_crossing_resource_sets():
    s = FifoScheduler()
    started = [j for j, _ in s.add("x", ["r1", "r2"])]
    started += [j for j, _ in s.add("y", ["r2", "r3"])]
    started += [j for j, _ in s.add("z", ["r3", "r1"])]
    order = []
    while started:
        job = started.pop(0)
        order.append(job)
        started += [j for j, _ in s.finish(job)]
    assert order == ["x", "y", "z"] and s.queued_ids() == []


@pytest.fixture
def runner(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    r = JobRunner(store, max_workers=8)
    yield r
    r.shutdown(wait=True)
    store.close()


def _wait_all(runner, ids, timeout=60.0):
    deadline = time.monotonic() + timeout
    for job_id in ids:
        while not runner.get(job_id).state.terminal:
            assert time.monotonic() < deadline, f"job {job_id} did not finish"
            time.sleep(0.01)
    return [runner.get(j) for j in ids]


def test_50_chained_jobs_on_one_resource_run_in_submission_order(runner):
    """Like 50 chained sparse patches: job i only succeeds if job i-1 already ran (8 pool threads)."""
    state = {"version": 0}
    overlap = threading.Lock()

    def step(i):
        def fn(ctx):
            assert overlap.acquire(blocking=False), "two jobs on one resource ran at once"
            try:
                time.sleep(random.random() * 0.004)
                if state["version"] != i:
                    raise RuntimeError(f"baseline_match: job {i} found version {state['version']}")
                state["version"] = i + 1
                return {"version": i + 1}
            finally:
                overlap.release()
        return fn

    ids = [runner.submit(JobKind.sync_sparse, {"i": i}, ["trainer", "engine:e1"], step(i)).id for i in range(50)]
    jobs = _wait_all(runner, ids)
    assert [j.state for j in jobs] == [JobState.succeeded] * 50, [j.error for j in jobs if j.error][:3]
    assert [j.result["version"] for j in jobs] == list(range(1, 51))
    assert not runner.pending(["trainer", "engine:e1"])


def test_jobs_on_different_engines_run_concurrently_and_each_engine_in_order(runner):
    seen: dict[str, list[int]] = {"engine:a": [], "engine:b": []}
    both = threading.Barrier(2, timeout=10)

    def job(res, i):
        def fn(ctx):
            if i == 0:
                both.wait()  # the first job of each engine must run at the same time as the other's
            seen[res].append(i)
            return {}
        return fn

    ids = [runner.submit(JobKind.sync_dense, {}, [res], job(res, i)).id
           for i in range(10) for res in ("engine:a", "engine:b")]
    jobs = _wait_all(runner, ids)
    assert all(j.state == JobState.succeeded for j in jobs)
    assert seen == {"engine:a": list(range(10)), "engine:b": list(range(10))}


def test_cancelling_a_queued_job_removes_it_and_the_next_runs(runner):
    gate, ran = threading.Event(), []

    def first(ctx):
        gate.wait(10)
        ran.append("first")
        return {}

    a = runner.submit(JobKind.sync_dense, {}, ["engine:e"], first).id
    b = runner.submit(JobKind.sync_dense, {}, ["engine:e"], lambda ctx: ran.append("second") or {}).id
    c = runner.submit(JobKind.sync_dense, {}, ["engine:e"], lambda ctx: ran.append("third") or {}).id
    assert runner.cancel(b).state == JobState.cancelled
    gate.set()
    ja, jb, jc = _wait_all(runner, [a, b, c])
    assert (ja.state, jb.state, jc.state) == (JobState.succeeded, JobState.cancelled, JobState.succeeded)
    assert ran == ["first", "third"] and jb.started_at is None


def test_a_running_job_stops_at_its_safe_point_and_the_queue_moves_on(runner):
    started = threading.Event()

    def slow(ctx):
        started.set()
        while True:
            ctx.check_cancelled()
            time.sleep(0.01)

    a = runner.submit(JobKind.sync_dense, {}, ["engine:e"], slow).id
    b = runner.submit(JobKind.sync_dense, {}, ["engine:e"], lambda ctx: {"ok": True}).id
    assert started.wait(10)
    runner.cancel(a)
    ja, jb = _wait_all(runner, [a, b])
    assert ja.state == JobState.cancelled and jb.state == JobState.succeeded


def test_a_failing_job_does_not_stall_the_queue(runner):
    def boom(ctx):
        raise ValueError("broken transfer")

    a = runner.submit(JobKind.sync_dense, {}, ["engine:e"], boom).id
    b = runner.submit(JobKind.sync_dense, {}, ["engine:e"], lambda ctx: {}).id
    ja, jb = _wait_all(runner, [a, b])
    assert ja.state == JobState.failed and "broken transfer" in ja.error and jb.state == JobState.succeeded


def test_jobs_cancelled_via_exception_are_recorded(runner):
    def cancels(ctx):
        raise JobCancelled("stopped at a safe point")

    (j,) = _wait_all(runner, [runner.submit(JobKind.sync_dense, {}, ["x"], cancels).id])
    assert j.state == JobState.cancelled and j.error == "stopped at a safe point"
