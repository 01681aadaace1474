"""`wsync` CLI: argument parsing, format_report, and commands against a MockTransport-backed client."""

from __future__ import annotations

import json

import httpx
import pytest

from wsync import cli
from wsync.report import failed_verdicts, format_report
from wsync.schemas import ComparisonReport
from wsync_client import Client

NOW = "2025-01-01T00:00:00Z"


def make_report(**verdicts) -> dict:
    v = {"baseline_equal": True, "patch_selection_equal": True, "patch_digest_equal": True,
         "after_equal": True, "any_output_changed": True, **verdicts}

    def phase(eid: str, after: list[list[int]]) -> dict:
        return {"engine_id": eid, "trainer_before": [[11], [12]], "before": [[11], [12]], "after": after,
                "trainer_after": [[21], [12]], "selected_token_ids": [9707, 11], "patch_digest": "d1g35t",
                "payload_bytes": 8_933_376 if eid == "e-dense" else 24_576, "wire_bytes": 8_933_376,
                "send_ms": 12.345, "total_ms": 40.0, "verified": True}

    return {"ok": all(v.values()), "model": "tiny-qwen2", "engine_kind": "reference",
            "prompts": ["Hello, my name is", "The capital of France is"], "verdicts": v,
            "trainer_engine_baseline_equal": True, "dense_payload_mb": 8.5195, "sparse_payload_mb": 0.0234,
            "dense_send_ms": 12.345, "sparse_send_ms": 1.5, "dense": phase("e-dense", [[21], [12]]),
            "sparse": phase("e-sparse", [[21], [12]])}


def job(state: str = "queued", kind: str = "comparison", **extra) -> dict:
    return {"id": "j-1", "kind": kind, "state": state, "created_at": NOW, **extra}


class Server:
    """Route table for MockTransport: {(method, path): response | [responses...]}; records requests."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.routes.get((request.method, request.url.path))
        if item is None:  # e.g. the job event stream: the CLI falls back to polling
            return httpx.Response(404, json={"error": {"type": "not_found", "message": "no route"}})
        if isinstance(item, list):
            item = item.pop(0) if len(item) > 1 else item[0]
        return item

    def factory(self, url: str) -> Client:
        c = Client(url, transport=httpx.MockTransport(self), max_retries=0)
        c._sleep = lambda s: None
        return c


def run(capsys, argv, server: Server):
    code = cli.main(argv, client_factory=server.factory)
    out, err = capsys.readouterr()
    return code, out, err


# -- parsing ----------------------------------------------------------------------------------------

def test_parse_commands():
    p = cli.build_parser()
    a = p.parse_args(["--url", "http://h:1", "sync", "sparse", "--engine", "e1", "--engine", "e2",
                      "--patch", "p-1", "--encoding", "gap", "--wait", "--json"])
    assert (a.command, a.mode, a.engine, a.patch, a.encoding, a.wait, a.json, a.url) == \
        ("sync", "sparse", ["e1", "e2"], "p-1", "gap", True, True, "http://h:1")
    a = p.parse_args(["engines", "launch", "--kind", "vllm", "--model", "m", "--name", "n"])
    assert (a.action, a.kind, a.model, a.name, a.no_wait) == ("launch", "vllm", "m", "n", False)
    a = p.parse_args(["patch", "--kind", "random", "--density", "0.01", "--seed", "3"])
    assert (a.kind, a.density, a.seed, a.rows) == ("random", 0.01, 3, None)
    a = p.parse_args(["compare", "--engine-kind", "vllm", "--no-wait"])
    assert (a.engine_kind, a.no_wait) == ("vllm", True)
    a = p.parse_args(["demo", "--port", "9000", "--json"])
    assert (a.url, a.port, a.json) == (None, 9000, True)
    assert p.parse_args(["engines", "--json", "list"]).json is True
    assert p.parse_args(["trainer"]).action is None
    assert p.parse_args(["serve", "--port", "1234"]).port == 1234
    with pytest.raises(SystemExit):
        p.parse_args(["sync", "sparse", "--engine", "e1"])  # --patch is required


# -- report -----------------------------------------------------------------------------------------

def test_format_report_pass():
    text = format_report(ComparisonReport.model_validate(make_report()))
    lines = text.splitlines()
    for label in ("Dense baseline outputs", "Sparse baseline outputs", "Dense outputs after update",
                  "Sparse outputs after update"):
        assert label in lines
    assert "Prompt: 'Hello, my name is'" in lines and "Token IDs: [21]" in lines
    for line in ("patched_token_ids = [9707, 11]", "patch_selection_equal = True", "dense_patch_digest = d1g35t",
                 "sparse_patch_digest = d1g35t", "patch_digest_equal = True", "baseline_equal = True",
                 "after_equal = True", "any_output_changed = True", "trainer_engine_baseline_equal = True",
                 "dense_payload_mb = 8.52", "sparse_payload_mb = 0.02", "dense_send_ms = 12.35",
                 "sparse_send_ms = 1.50"):
        assert line in lines, line
    assert any(line.startswith("sparse/dense payload ratio = 0.0028") for line in lines)
    assert lines[-1] == "RESULT: PASS"


def test_format_report_fail_lists_false_verdicts():
    rep = ComparisonReport.model_validate(make_report(after_equal=False, any_output_changed=False))
    assert failed_verdicts(rep) == ["after_equal", "any_output_changed"]
    assert format_report(rep).splitlines()[-1] == "RESULT: FAIL (after_equal, any_output_changed)"


# -- commands ---------------------------------------------------------------------------------------

def test_engines_list_table(capsys):
    srv = Server({("GET", "/v1/engines"): httpx.Response(200, json={
        "items": [{"id": "e-1", "kind": "reference", "model": "tiny", "state": "ready", "created_at": NOW}],
        "total": 1, "limit": 50, "offset": 0})})
    code, out, _ = run(capsys, ["--url", "http://x", "engines", "list"], srv)
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split()[:3] == ["ID", "KIND", "STATE"] and row.split()[:3] == ["e-1", "reference", "ready"]
    assert str(srv.requests[0].url).startswith("http://x/v1/engines")


def test_compare_waits_prints_report_and_exit_codes(capsys):
    for verdicts, expected in (({}, 0), ({"after_equal": False}, 1)):
        srv = Server({("POST", "/v1/comparisons"): httpx.Response(202, json=job()),
                      ("GET", "/v1/jobs/j-1"): [httpx.Response(200, json=job("running")),
                                                httpx.Response(200, json=job("succeeded",
                                                                             result=make_report(**verdicts)))]})
        code, out, err = run(capsys, ["compare", "--engine-kind", "reference", "--rows", "8"], srv)
        assert code == expected
        assert json.loads(srv.requests[0].content) == {"engine_kind": "reference", "rows": 8}
        assert out.strip().splitlines()[-1] == ("RESULT: PASS" if expected == 0 else "RESULT: FAIL (after_equal)")
        assert "[j-1] running" in err


def test_compare_json(capsys):
    srv = Server({("POST", "/v1/comparisons"): httpx.Response(202, json=job()),
                  ("GET", "/v1/jobs/j-1"): httpx.Response(200, json=job("succeeded", result=make_report()))})
    code, out, err = run(capsys, ["compare", "--json"], srv)
    assert code == 0 and err == ""
    assert json.loads(out)["verdicts"]["after_equal"] is True


def test_api_error_prints_and_exits_2(capsys):
    body = {"error": {"type": "not_found", "message": "engine e-x not found", "field": "engine_id",
                      "request_id": "rid-7"}}
    srv = Server({("GET", "/v1/engines/e-x"): httpx.Response(404, json=body)})
    code, out, err = run(capsys, ["engines", "get", "e-x"], srv)
    assert code == 2 and out == ""
    assert err.strip() == "error: 404 not_found: engine e-x not found (field=engine_id, request_id=rid-7)"


def test_job_wait_failed_exits_2(capsys):
    srv = Server({("GET", "/v1/jobs/j-1"): httpx.Response(200, json=job("failed", kind="sync_dense",
                                                                        error="engine died"))})
    code, _, err = run(capsys, ["job", "j-1", "--wait"], srv)
    assert code == 2 and "engine died" in err


def test_sync_dense_wait_prints_summary(capsys):
    result = {"mode": "dense", "engine_ids": ["e-1"], "payload_bytes": 2 * 1024 * 1024, "wire_bytes": 2 * 1024 * 1024,
              "send_ms": 3.0, "total_ms": 9.0, "tensors": 24, "version": "p-1", "verified": True,
              "engines": [{"engine_id": "e-1", "recv_ms": 3.1, "version": "p-1", "fingerprint_equal": True}]}
    srv = Server({("POST", "/v1/sync/dense"): httpx.Response(202, json=job(kind="sync_dense")),
                  ("GET", "/v1/jobs/j-1"): httpx.Response(200, json=job("succeeded", kind="sync_dense",
                                                                        result=result))})
    code, out, _ = run(capsys, ["sync", "dense", "--engine", "e-1", "--wait"], srv)
    assert code == 0 and "payload 2.00 MB" in out and "verified=True" in out
    assert json.loads(srv.requests[0].content) == {"engine_ids": ["e-1"], "bucket_bytes": None, "verify": True}


def test_connection_error_exits_2(capsys):
    def refuse(request):
        raise httpx.ConnectError("refused")

    code = cli.main(["trainer"], client_factory=lambda url: Client(url, transport=httpx.MockTransport(refuse),
                                                                   max_retries=0))
    assert code == 2 and capsys.readouterr().err.startswith("error: connection:")


def test_demo_with_url_and_with_started_server(capsys, monkeypatch):
    routes = {("POST", "/v1/comparisons"): httpx.Response(202, json=job()),
              ("GET", "/v1/jobs/j-1"): httpx.Response(200, json=job("succeeded", result=make_report()))}
    srv = Server(dict(routes))
    code, out, _ = run(capsys, ["demo", "--url", "http://remote:1"], srv)
    assert code == 0 and "RESULT: PASS" in out and srv.requests[0].url.host == "remote"

    events = []

    class FakeServer:
        def __init__(self, port=None, client_factory=None):
            self.url, self.log_path = f"http://127.0.0.1:{port}", "/tmp/log"

        def start(self):
            events.append("start")
            return self

        def wait_ready(self, timeout):
            events.append(("ready", timeout))

        def log_tail(self, n=200):
            return ""

        def stop(self):
            events.append("stop")

    monkeypatch.setattr(cli, "LocalServer", FakeServer)
    srv = Server(dict(routes))
    code, out, _ = run(capsys, ["demo", "--port", "9999", "--json"], srv)
    assert code == 0 and json.loads(out)["ok"] is True
    assert events == ["start", ("ready", 300.0), "stop"] and srv.requests[0].url.port == 9999


def test_version_flag(capsys):
    from wsync import __version__

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"wsync {__version__}"


def test_connection_refused_hints_at_wsync_serve(capsys):
    def refuse(request):
        raise httpx.ConnectError("refused")

    code = cli.main(["jobs", "--url", "http://127.0.0.1:9"],
                    client_factory=lambda url: Client(url, transport=httpx.MockTransport(refuse), max_retries=0))
    assert code == 2 and "is `wsync serve` running at http://127.0.0.1:9?" in capsys.readouterr().err
