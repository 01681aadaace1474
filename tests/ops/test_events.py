"""The event bus and its SSE routes over a real uvicorn server; the SDK's stream/follow against it."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from wsync.jobs.events import EventBus
from wsync.schemas import JobKind
from wsync_client import AsyncClient, Client, JobFailedError, ServerEvent
from wsync_client._events import SSEDecoder

REPORT = {"mode": "dense", "engine_ids": ["e-1"], "payload_bytes": 10, "wire_bytes": 10, "send_ms": 1.0,
          "total_ms": 5.0, "tensors": 2, "version": "v1", "verified": True,
          "engines": [{"engine_id": "e-1", "recv_ms": 1.0, "version": "v1", "fingerprint_equal": True}]}


def test_bus_ids_increase_buffer_is_bounded_and_gaps_are_reported():
    bus = EventBus(capacity=3)
    ids = [bus.publish("x", {"i": i}).id for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    kept, gap = bus.since(None)
    assert [e.data["i"] for e in kept] == [2, 3, 4] and not gap
    after, gap = bus.since(ids[0])          # ids[1] was dropped: the resuming client must know
    assert gap and [e.data["i"] for e in after] == [2, 3, 4]
    after, gap = bus.since(ids[2])
    assert not gap and [e.data["i"] for e in after] == [3, 4]
    after, gap = bus.since(ids[0] - 10 ** 9)  # an id from an earlier run: everything kept, no gap
    assert not gap and len(after) == 3


def test_bus_listener_errors_do_not_reach_the_publisher():
    bus, seen = EventBus(), []
    bus.subscribe(lambda ev: 1 / 0)
    bus.subscribe(seen.append)
    bus.publish("k", {"a": 1})
    assert [e.kind for e in seen] == ["k"]


def test_sse_decoder_multiline_comments_and_ids():
    dec = SSEDecoder()
    out = [dec.feed(line) for line in [": keep-alive", "", "id: 7", "event: job.state",
                                       'data: {"kind": "job.state",', 'data: "data": {"state": "running"}}', ""]]
    ev = [e for e in out if e is not None]
    assert len(ev) == 1 and ev[0].id == 7 and ev[0].data == {"state": "running"} and dec.last_id == 7


def _job(server, fail: bool = False, gate: threading.Event | None = None):
    def fn(ctx):
        if gate is not None:
            gate.wait(10)
        ctx.event("moving bytes", phase="send", bytes_done=5, bytes_total=10)
        if fail:
            raise RuntimeError("the wire broke")
        return REPORT
    return server.state.runner.submit(JobKind.sync_dense, {"engine_ids": ["e-1"]}, ["engine:e-1"], fn)


def test_job_stream_snapshot_progress_report_and_end(server):
    gate = threading.Event()
    job = _job(server, gate=gate)
    seen: list[ServerEvent] = []
    with Client(server.url) as c:
        threading.Timer(0.3, gate.set).start()
        done = c.jobs.follow(job.id, timeout=30, on_event=seen.append)
    kinds = [e.kind for e in seen]
    assert kinds[0] == "job.snapshot" and seen[0].id is None
    assert "job.event" in kinds and "sync.finished" in kinds and kinds[-1] == "job.state"
    prog = next(e for e in seen if e.kind == "job.event")
    assert prog.data == {"message": "moving bytes", "phase": "send", "bytes_done": 5, "bytes_total": 10}
    fin = next(e for e in seen if e.kind == "sync.finished")
    assert fin.data["total_ms"] == 5.0 and fin.data["job_id"] == job.id
    assert seen[-1].data["state"] == "succeeded" and done.result["mode"] == "dense"
    ids = [e.id for e in seen if e.id is not None]
    assert ids == sorted(ids)


def test_follow_a_failed_job_raises_with_the_cause(server):
    job = _job(server, fail=True)
    with Client(server.url) as c, pytest.raises(JobFailedError) as err:
        c.jobs.follow(job.id, timeout=30)
    assert "the wire broke" in (err.value.job.error or "")


def test_finished_job_stream_replays_and_ends(server):
    job = _job(server)
    server.wait_job(job.id, 10)
    r = httpx.get(f"{server.url}/v1/jobs/{job.id}/events", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.startswith("event: job.snapshot") and "event: sync.finished" in r.text


def test_resume_with_last_event_id_gets_only_later_events(server):
    first = server.bus.publish("test.a", {"n": 1})
    server.bus.publish("test.b", {"n": 2})
    server.bus.publish("test.c", {"n": 3})
    r = httpx.get(f"{server.url}/v1/events", params={"max_events": 2},
                  headers={"Last-Event-ID": str(first.id)}, timeout=10)
    dec = SSEDecoder()
    got = [e for e in (dec.feed(line) for line in r.text.split("\n")) if e is not None]
    assert [e.kind for e in got] == ["test.b", "test.c"] and got[0].id == first.id + 1


def test_keepalive_comment_and_bounded_stream(server):
    r = httpx.get(f"{server.url}/v1/events", params={"keepalive": 0.2, "timeout": 0.9}, timeout=10)
    assert r.status_code == 200 and ": keep-alive" in r.text


def test_bad_last_event_id_is_a_422_naming_it(server):
    r = httpx.get(f"{server.url}/v1/events", headers={"Last-Event-ID": "abc"}, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["field"] == "Last-Event-ID"
    r = httpx.get(f"{server.url}/v1/jobs/job-nope/events", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["field"] == "job_id"


def test_async_client_streams_live_events(server):
    async def main():
        async with AsyncClient(server.url) as c:
            got = []
            threading.Timer(0.5, lambda: server.bus.publish("sync.finished", dict(REPORT))).start()
            async for ev in c.events.stream(kinds=["sync.finished"], max_events=1, timeout=20):
                got.append(ev)
            return got
    got = asyncio.run(main())
    assert len(got) == 1 and got[0].kind == "sync.finished" and got[0].data["mode"] == "dense"


def test_cli_follow_json_prints_event_lines_then_the_job(server, capsys):
    import json as _json

    from wsync import cli

    gate = threading.Event()
    job = _job(server, gate=gate)
    threading.Timer(0.3, gate.set).start()
    code = cli.main(["job", job.id, "--follow", "--json", "--url", server.url])
    out = capsys.readouterr().out.strip().splitlines()
    rows = [_json.loads(line) for line in out]
    assert code == 0 and rows[0]["kind"] == "job.snapshot"
    assert any(r.get("kind") == "job.event" and r["data"]["bytes_done"] == 5 for r in rows), rows
    assert rows[-1]["id"] == job.id and rows[-1]["state"] == "succeeded"


def test_cli_wait_human_lines_when_not_a_terminal(server, capsys):
    from wsync import cli

    job = _job(server)
    code = cli.main(["job", job.id, "--wait", "--url", server.url])
    cap = capsys.readouterr()
    assert code == 0 and f"[{job.id}] succeeded" in cap.err and "dense sync" in cap.out
