"""(a) the comparison through the running service with vLLM engines (trainer on GPU0, engine on GPU1);
(b) the same with the reference engine over NCCL. Runs first: its Ray cluster is gone before (c) starts."""

import json

import pytest

from .story import VERDICTS

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def service(report_dir):
    from wsync_client.local import LocalServer

    # private SQLite in a temp dir; the log goes straight to the report dir, so a run cut off by a time
    # limit still leaves it there
    server = LocalServer(env={"WSYNC_DEVICE": "cuda"}, ready_timeout=600, log_path=report_dir / "service.log")
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _compare(service, report_dir, kind: str) -> dict:
    from wsync_client import Client

    with Client(service.url, timeout=900) as c:
        job = c.comparisons.create(engine_kind=kind, gpu_memory_utilization=0.3)
        done = c.jobs.wait(job.id, timeout=1200)
    (report_dir / f"service_{kind}.json").write_text(json.dumps(done.result, indent=2))
    return done.result


def test_a_service_comparison_vllm(service, report_dir):
    report = _compare(service, report_dir, "vllm")
    assert report["verdicts"] == {k: True for k in VERDICTS}, report["verdicts"]
    assert report["sparse_payload_mb"] < 0.01 * report["dense_payload_mb"]


def test_b_service_comparison_reference_nccl(service, report_dir):
    report = _compare(service, report_dir, "reference")
    assert report["verdicts"] == {k: True for k in VERDICTS}, report["verdicts"]
    assert report["dense"]["verified"] and report["sparse"]["verified"]


def test_c_service_vllm_direct_route_training_loop(service, report_dir):
    """A training loop into a vLLM engine on the direct route (opt-in): dense seed, sparse patches
    with wsync's own encodings (not vLLM's flat_int32 wire), a real AdamW step, then a delta sync;
    every sync verified by exact fingerprints of the tensors both sides name alike."""
    from wsync_client import Client

    with Client(service.url, timeout=900) as c:
        c.trainer.load()
        eng = c.engines.launch(kind="vllm", gpu_memory_utilization=0.3, sync_route="direct")
        assert eng.details["route"] == "direct", eng.details
        results = [c.wait(c.sync.dense([eng.id]).id, timeout=600).result]
        for step in range(2):
            patch = c.patches.prepare(kind="random", density=0.001, seed=step)
            results.append(c.wait(c.sync.sparse([eng.id], patch_id=patch.id, encoding="auto").id, timeout=600).result)
        results.append(c.wait(c.sync.dense([eng.id]).id, timeout=600).result)  # seeds the delta snapshot
        c.trainer.step(optimizer="adamw", lr=1e-5)
        results.append(c.wait(c.sync.sparse([eng.id], delta=True, encoding="auto").id, timeout=600).result)
        c.engines.delete(eng.id)
    (report_dir / "service_vllm_direct.json").write_text(json.dumps(results, indent=2))
    assert all(r["verified"] for r in results), [r["verified"] for r in results]
    assert results[1]["wire_bytes"] < results[1]["payload_bytes"]  # a compact encoding, not flat_int32
    assert 0 < results[-1]["changed_fraction"] < 1
