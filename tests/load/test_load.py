"""Bounded load through the real service (uvicorn child process, real Ray, gloo, the tiny model),
loopback only: N concurrent sync requests on one engine, N spread over 4 engines, and a chain of N
inline sparse patches POSTed in order without waiting. Every job must finish, each engine's jobs
must run one at a time in submission order, none lost or duplicated. Numbers go to
bench/results/load-cpu.json (recorded, never asserted as times). ``WSYNC_LOAD_N`` scales (default 50).
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from wsync_client import Client
from wsync_client.local import LocalServer

pytestmark = pytest.mark.load
N = int(os.environ.get("WSYNC_LOAD_N", "50"))
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "load-cpu.json"
NUMBERS: dict = {"n": N, "cpus": os.cpu_count()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("load")
    env = {"WSYNC_DATABASE_URL": f"sqlite:///{d / 'wsync.db'}", "WSYNC_RAY_NUM_CPUS": "2", "WSYNC_DEVICE": "cpu",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    with LocalServer(env=env, ready_timeout=240, log_path=d / "server.log") as srv:
        with Client(srv.url) as c:
            c.trainer.load()
            engines = [c.engines.launch(kind="reference", name=f"load{i}").id for i in range(4)]
        yield srv, engines
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(NUMBERS, indent=2) + "\n")


def _ts(value) -> float:
    return (value if isinstance(value, datetime) else datetime.fromisoformat(value)).timestamp()


def _finish_all(c, ids, timeout=1800.0):
    deadline, jobs = time.monotonic() + timeout, {}
    while len(jobs) < len(ids):
        for j in c.jobs.list(limit=200).items:
            if j.id in ids and j.state.terminal:
                jobs[j.id] = j
        assert time.monotonic() < deadline, f"{len(ids) - len(jobs)} jobs still unfinished"
        time.sleep(0.5)
    return [jobs[i] for i in ids]


def _assert_serialized_in_order(jobs_of_engine):
    """Jobs on one engine, in submission (created_at) order, started and finished one after another."""
    ordered = sorted(jobs_of_engine, key=lambda j: _ts(j.created_at))
    for before, after in zip(ordered, ordered[1:]):
        assert _ts(before.finished_at) <= _ts(after.started_at), (before.id, after.id)


def _burst(srv, post, n, workers=25):
    with Client(srv.url) as c, ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        ids = list(pool.map(lambda i: post(c, i).id, range(n)))
        t_post = time.perf_counter() - t0
        results_before = c.results.list(limit=1).total
        jobs = _finish_all(c, ids)
        t_all = time.perf_counter() - t0
        assert len(set(ids)) == n, "duplicate job ids"
        assert [j.state.value for j in jobs] == ["succeeded"] * n, [j.error for j in jobs if j.error][:3]
        results = [r for r in c.results.list(limit=200).items if r.job_id in set(ids)]
        assert sorted(r.job_id for r in results) == sorted(ids), "a job lost or duplicated its result"
        return jobs, {"post_s": round(t_post, 3), "all_done_s": round(t_all, 3),
                      "syncs_per_s": round(n / t_all, 3), "results_total_before": results_before}


def test_concurrent_dense_syncs_on_one_engine(server):
    srv, engines = server
    jobs, numbers = _burst(srv, lambda c, i: c.sync.dense([engines[0]]), N)
    _assert_serialized_in_order(jobs)
    NUMBERS["one_engine_dense"] = numbers


def test_concurrent_dense_syncs_over_four_engines(server):
    srv, engines = server
    jobs, numbers = _burst(srv, lambda c, i: c.sync.dense([engines[i % 4]]), N)
    for k, eid in enumerate(engines):
        mine = [j for j in jobs if j.request["engine_ids"] == [eid]]
        assert len(mine) == len(range(k, N, 4))
        _assert_serialized_in_order(mine)
    NUMBERS["four_engines_dense"] = numbers


def test_a_chain_of_inline_sparse_patches_posted_without_waiting(server):
    """Each patch moves the trainer and the engine one version on; out of order they fail baseline_match."""
    srv, engines = server
    eid = engines[1]
    with Client(srv.url) as c:
        c.wait(c.sync.dense([eid]).id, timeout=600)  # a known baseline
        t0 = time.perf_counter()
        ids = [c.sync.sparse([eid], patches=[{"name": "model.norm.weight", "indices": [i % 64],
                                              "values": [1.0 + i / 64]}]).id for i in range(N)]
        jobs = _finish_all(c, ids)
        t_all = time.perf_counter() - t0
        assert [j.state.value for j in jobs] == ["succeeded"] * N, [j.error for j in jobs if j.error][:3]
        _assert_serialized_in_order(jobs)
        assert c.engines.get(eid).version == jobs[-1].result["version"]
        assert all(j.result["verified"] for j in jobs)
    NUMBERS["chained_inline_sparse"] = {"all_done_s": round(t_all, 3), "syncs_per_s": round(N / t_all, 3)}
