"""examples/rl_loop.py --local on CPU: the reward rises, every sync verifies, and the engine's logprobs
equal the trainer's exactly after every sync (same weights, same kernels)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_rl_loop_local(tmp_path):
    spec = importlib.util.spec_from_file_location("rl_loop", ROOT / "examples" / "rl_loop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    assert mod.main(["--steps", "4", "--prompts", "2", "--group", "8", "--out", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert r["steps"] == [1, 2, 3, 4]
    assert r["rewards"][-1] > r["rewards"][0]
    assert r["logprob_max_abs_diff"] == [0.0] * 4
    assert all(s["verified"] and s["wire_bytes"] > 0 and s["mode"] in ("dense", "sparse") for s in r["syncs"])
    assert [v["engine"] for v in r["versions"]] == ["1", "2", "3", "4"]
    assert r["versions"][0]["rollouts"] == "0"  # rollouts stamped with the version the engine served
