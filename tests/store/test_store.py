"""The job store on SQLite and PostgreSQL: page bounds, interrupted jobs, the instance lease, and
concurrent writers from two Store instances."""

import threading
import time

import pytest

from tests.dbs import db_url  # noqa: F401  (fixture)
from wsync.errors import InvalidInput
from wsync.jobs.lease import InstanceLease, LeaseHeld
from wsync.jobs.store import MAX_OFFSET, Store
from wsync.schemas import JobKind, JobState


@pytest.fixture
def store(db_url):  # noqa: F811
    s = Store(db_url)
    yield s
    s.close()


@pytest.mark.parametrize("method", ["list_jobs", "list_results", "list_patches"])
def test_offset_beyond_the_bound_is_refused_naming_offset(store, method):
    with pytest.raises(InvalidInput) as err:
        getattr(store, method)(offset=2**63)
    assert err.value.field == "offset" and err.value.status == 422
    items, total = getattr(store, method)(offset=MAX_OFFSET)
    assert items == [] and total == 0


def test_unfinished_jobs_become_interrupted_with_the_time(store):
    queued = store.create_job(JobKind.sync_dense, {})
    running = store.create_job(JobKind.sync_sparse, {})
    done = store.create_job(JobKind.sync_dense, {})
    store.transition(running.id, [JobState.queued], JobState.running)
    store.transition(done.id, [JobState.queued], JobState.running)
    store.transition(done.id, [JobState.running], JobState.succeeded)
    assert store.interrupt_unfinished() == 2
    for job_id in (queued.id, running.id):
        job = store.get_job(job_id)
        assert job.state == JobState.interrupted and job.state.terminal
        assert job.finished_at is not None and "interrupted" in job.error
    assert store.get_job(done.id).state == JobState.succeeded
    assert store.interrupt_unfinished() == 0


def test_transitions_are_checked_in_sql(store):
    job = store.create_job(JobKind.sync_dense, {})
    assert store.transition(job.id, [JobState.running], JobState.succeeded) is None  # not running yet
    assert store.transition(job.id, [JobState.queued], JobState.cancelled).state == JobState.cancelled
    assert store.transition(job.id, [JobState.queued], JobState.running) is None      # cancelled stays cancelled
    assert store.get_job(job.id).state == JobState.cancelled


def test_two_store_instances_racing_on_one_job_cannot_both_start_it(db_url):  # noqa: F811
    a, b = Store(db_url), Store(db_url)
    try:
        jobs = [a.create_job(JobKind.sync_dense, {}) for _ in range(20)]
        wins: list[str] = []
        barrier = threading.Barrier(2)

        def race(store, name):
            barrier.wait()
            for job in jobs:
                if store.transition(job.id, [JobState.queued], JobState.running) is not None:
                    wins.append(name)
                    store.add_event(job.id, f"started by {name}")
                    store.transition(job.id, [JobState.running], JobState.succeeded, result={"by": name})

        threads = [threading.Thread(target=race, args=(s, n)) for s, n in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(wins) == 20  # each job started exactly once
        for job in jobs:
            got = b.get_job(job.id)
            assert got.state == JobState.succeeded and len(got.events) == 1
            assert got.events[0]["message"] == f"started by {got.result['by']}"
    finally:
        a.close()
        b.close()


def test_events_from_two_store_instances_are_all_kept(db_url):  # noqa: F811
    a, b = Store(db_url), Store(db_url)
    try:
        job = a.create_job(JobKind.sync_dense, {})

        def write(store, name):
            for i in range(25):
                store.add_event(job.id, f"{name}{i}")

        threads = [threading.Thread(target=write, args=(s, n)) for s, n in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        messages = {e["message"] for e in a.get_job(job.id).events}
        assert messages == {f"{n}{i}" for n in "ab" for i in range(25)}
    finally:
        a.close()
        b.close()


def test_a_second_instance_is_refused_while_the_lease_is_live(store):
    first = InstanceLease.take(store, "127.0.0.1:8321", ttl_s=30, heartbeat_s=10)
    try:
        with pytest.raises(LeaseHeld) as err:
            InstanceLease.take(store, "127.0.0.1:8322", ttl_s=30, heartbeat_s=10)
        assert err.value.holder.owner == first.owner and err.value.holder.address == "127.0.0.1:8321"
        assert "127.0.0.1:8321" in err.value.message
    finally:
        first.release()
    second = InstanceLease.take(store, "127.0.0.1:8322", ttl_s=30, heartbeat_s=10)  # released: free again
    second.release()


def test_a_stale_lease_is_taken_over_and_the_old_holder_learns_it_lost(store):
    old = InstanceLease.take(store, "host-a:1", ttl_s=0.3, heartbeat_s=0.2)
    old._stop.set()  # simulate a hung process: it stops renewing
    old._thread.join()
    time.sleep(0.5)
    new = InstanceLease.take(store, "host-b:2", ttl_s=30, heartbeat_s=10)
    try:
        assert store.get_lease().owner == new.owner
        assert store.renew_lease(old.owner, 30) is False
        old.release()  # releasing a lease we lost must not delete the new holder's row
        assert store.get_lease().owner == new.owner
    finally:
        new.release()
    assert store.get_lease() is None


def test_the_heartbeat_keeps_a_short_lease_alive(store):
    lease = InstanceLease.take(store, "h:1", ttl_s=0.6, heartbeat_s=0.1)
    try:
        time.sleep(1.0)
        with pytest.raises(LeaseHeld):
            InstanceLease.take(store, "h:2", ttl_s=1, heartbeat_s=0.5)
        assert not lease.lost.is_set()
    finally:
        lease.release()
