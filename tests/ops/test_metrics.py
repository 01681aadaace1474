"""/metrics over a real server: sync histograms by mode/transport/engine kind, failures, jobs, ledger."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from wsync.api.metrics import VersionLedger
from wsync.schemas import JobKind

from .test_events import REPORT


def scrape(server) -> dict:
    r = httpx.get(f"{server.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_a_finished_sync_shows_in_the_histograms(server):
    before = scrape(server)
    assert not any(k[0] == "wsync_sync_duration_seconds_count" for k in before)
    bad = {**REPORT, "mode": "sparse", "verified": False, "transport": "gloo", "total_ms": 2500.0,
           "engines": [{"engine_id": "e-9", "recv_ms": 1.0, "version": "v1", "kind": "vllm",
                        "fingerprint_equal": False}]}
    for report in (REPORT, bad):
        job = server.state.runner.submit(JobKind.sync_dense, {}, ["engine:e-1"], lambda ctx, r=report: r)
        server.wait_job(job.id, 10)
    m = scrape(server)
    dense = (("engine_kind", "unknown"), ("mode", "dense"), ("transport", "unknown"))
    sparse = (("engine_kind", "vllm"), ("mode", "sparse"), ("transport", "gloo"))
    assert m[("wsync_sync_duration_seconds_count", dense)] == 1
    assert m[("wsync_sync_duration_seconds_sum", dense)] == 0.005
    assert m[("wsync_sync_duration_seconds_bucket", tuple(sorted(sparse + (("le", "5.0"),))))] == 1
    assert m[("wsync_sync_duration_seconds_bucket", tuple(sorted(sparse + (("le", "2.5"),))))] == 1
    assert m[("wsync_sync_duration_seconds_bucket", tuple(sorted(sparse + (("le", "1.0"),))))] == 0
    assert m[("wsync_sync_wire_bytes_total", dense)] == 10
    assert m[("wsync_verification_failures_total", sparse)] == 1
    assert ("wsync_verification_failures_total", dense) not in m
    assert m[("wsync_jobs", (("state", "succeeded"),))] == 2
    assert m[("wsync_events_total", (("kind", "sync.finished"),))] == 2


def test_version_ledger_counts_versions_behind():
    led = VersionLedger()
    for v in ("base", "p1", "p2", "p2"):
        led.add(v)
    assert led.behind("base", "p2") == 2 and led.behind("p2", "p2") == 0 and led.behind("zz", "p2") is None
