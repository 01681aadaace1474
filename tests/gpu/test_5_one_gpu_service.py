"""ONE GPU, through the real service (LocalServer: uvicorn + Ray + real actors): the trainer and the engines
share the GPU (fractional Ray placement, WSYNC_COLOCATE=on, the server sees only the first GPU) and sync
over CUDA IPC (transport "cuda_ipc"):

(a) the comparison with vLLM engines: five verdicts true, payloads equal to the byte to the two-GPU
    run's (dense 10,494,464 B, sparse 49,152 B for the generated model), both phases over cuda_ipc;
(b) the same with reference engines;
(c) a training loop into a vLLM engine: dense, sparse (encoding auto) x2, dense, a real AdamW step, a
    delta sync; every sync verified by exact fingerprints;
(d) a colocated vLLM engine that cannot fit is refused at once (409 naming gpu_memory_utilization).

Writes one_gpu_*.json and keeps the service log (service-1gpu.log) in $WSYNC_GPU_REPORT_DIR.
Run: python -m pytest tests/gpu/test_5_one_gpu_service.py -m gpu1 -v -s -o addopts=""
"""

from __future__ import annotations

import json
import os
import time

import pytest

from .story import VERDICTS

pytestmark = pytest.mark.gpu1

DENSE_BYTES = 10_494_464
SPARSE_BYTES = 49_152
JOB_TIMEOUT_S = 300


def _first_gpu() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return visible.split(",")[0] if visible else "0"


@pytest.fixture(scope="module")
def service(report_dir):
    from wsync_client.local import LocalServer

    env = {"WSYNC_DEVICE": "cuda", "WSYNC_COLOCATE": "on", "CUDA_VISIBLE_DEVICES": _first_gpu()}
    server = LocalServer(env=env, ready_timeout=300, log_path=report_dir / "service-1gpu.log")
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _save(report_dir, name: str, data) -> None:
    (report_dir / f"one_gpu_{name}.json").write_text(json.dumps(data, indent=2, default=str))


def _compare(service, report_dir, kind: str) -> dict:
    from wsync_client import Client

    t0 = time.perf_counter()
    with Client(service.url, timeout=JOB_TIMEOUT_S) as c:
        job = c.comparisons.create(engine_kind=kind, gpu_memory_utilization=0.3)
        done = c.jobs.wait(job.id, timeout=JOB_TIMEOUT_S)
    out = {"state": str(done.state), "error": done.error, "result": done.result, "wall_s": time.perf_counter() - t0}
    _save(report_dir, f"comparison_{kind}", out)
    assert done.result, f"comparison failed: {done.error}"
    return done.result


def _check_comparison(report: dict) -> None:
    assert report["verdicts"] == {k: True for k in VERDICTS}, report["verdicts"]
    assert report["dense"]["payload_bytes"] == DENSE_BYTES, report["dense"]["payload_bytes"]
    assert report["sparse"]["payload_bytes"] == SPARSE_BYTES, report["sparse"]["payload_bytes"]
    assert report["dense"]["transport"] == report["sparse"]["transport"] == "cuda_ipc", \
        (report["dense"]["transport"], report["sparse"]["transport"])
    assert report["dense"]["verified"] and report["sparse"]["verified"]


def test_a_one_gpu_comparison_vllm(service, report_dir):
    _check_comparison(_compare(service, report_dir, "vllm"))


def test_b_one_gpu_comparison_reference(service, report_dir):
    _check_comparison(_compare(service, report_dir, "reference"))


def test_c_one_gpu_vllm_training_loop(service, report_dir):
    """dense seed, sparse (auto encoding) x2, dense, AdamW step, delta: all over cuda_ipc, all verified."""
    from wsync_client import Client

    results, eng = [], None
    with Client(service.url, timeout=JOB_TIMEOUT_S) as c:
        try:
            c.trainer.load()
            eng = c.engines.launch(kind="vllm", gpu_memory_utilization=0.3)
            _save(report_dir, "loop_engine", eng.model_dump(mode="json") if hasattr(eng, "model_dump") else str(eng))
            assert eng.state.value == "ready", eng.error
            assert eng.details["transport"] == "cuda_ipc", eng.details

            def run(job):
                done = c.wait(job.id, timeout=JOB_TIMEOUT_S)
                results.append({"state": str(done.state), "error": done.error, "result": done.result})
                assert done.result, f"sync failed: {done.error}"
                return done.result

            run(c.sync.dense([eng.id]))
            for step in range(2):
                patch = c.patches.prepare(kind="random", density=0.001, seed=step)
                run(c.sync.sparse([eng.id], patch_id=patch.id, encoding="auto"))
            run(c.sync.dense([eng.id]))  # seeds the delta snapshot
            c.trainer.step(optimizer="adamw", lr=1e-5)
            last = run(c.sync.sparse([eng.id], delta=True, encoding="auto"))
        finally:
            _save(report_dir, "loop", results)
            if eng is not None:
                c.engines.delete(eng.id)
    assert all(r["result"]["verified"] for r in results), [r["result"]["verified"] for r in results]
    assert all(e["transport"] == "cuda_ipc" for r in results for e in r["result"]["engines"])
    assert 0 < last["changed_fraction"] < 1


def test_d_one_gpu_engine_that_cannot_fit_is_refused_at_once(service, report_dir):
    from wsync_client import Client, WsyncError

    with Client(service.url, timeout=60) as c:
        c.trainer.load()
        t0 = time.perf_counter()
        with pytest.raises(WsyncError) as err:
            c.engines.launch(kind="vllm", gpu_memory_utilization=0.99)
        took = time.perf_counter() - t0
    _save(report_dir, "refusal", {"error": str(err.value), "s": took})
    assert "gpu_memory_utilization" in str(err.value)
