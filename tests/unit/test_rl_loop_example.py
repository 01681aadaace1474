"""examples/rl_loop.py on CPU, both modes: the reward rises, every sync verifies, and the engine's
logprobs equal the trainer's exactly after every sync (same weights, same kernels).

Default (service) mode: a real wsync service child process (uvicorn + Ray actors), a reference engine,
this process as the trainer through the SDK Publisher over gloo, rollouts from POST /v1/engines/{id}/sample."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("rl_loop", ROOT / "examples" / "rl_loop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check(r: dict, steps: int) -> None:
    assert r["steps"] == list(range(1, steps + 1))
    assert r["rewards"][-1] > r["rewards"][0]
    assert r["logprob_max_abs_diff"] == [0.0] * steps
    assert all(s["verified"] is True and s["wire_bytes"] > 0 and s["mode"] in ("dense", "sparse") for s in r["syncs"])
    assert [v["published"] for v in r["versions"]] == [str(s) for s in range(1, steps + 1)]
    assert r["versions"][0]["rollouts"] == "0"  # rollouts stamped with the version the engine served


def test_rl_loop_local(tmp_path):
    out = tmp_path / "r.json"
    assert _example().main(["--local", "--steps", "4", "--prompts", "2", "--group", "8", "--out", str(out),
                            "--quiet"]) == 0
    r = json.loads(out.read_text())
    _check(r, 4)
    assert [v["engine"] for v in r["versions"]] == ["1", "2", "3", "4"]


@pytest.mark.timeout(600)
def test_rl_loop_through_the_service(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    out = tmp_path / "r.json"
    assert _example().main(["--steps", "4", "--prompts", "2", "--group", "8", "--out", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    _check(r, 4)
    # the engine served each published version right after its sync (the next rollouts are stamped so)
    assert [v["engine"] for v in r["versions"]] == ["1", "2", "3", "4"]
