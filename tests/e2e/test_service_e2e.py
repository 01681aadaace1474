"""The whole reference story through the SDK against the service running as its own process."""

import pytest

from wsync_client import Client, ConflictError, UnprocessableEntityError

from .conftest import start_service

pytestmark = pytest.mark.e2e


def test_comparison_through_the_sdk(service):
    with Client(service.url, timeout=120) as client:
        job = client.comparisons.create()
        done = client.jobs.wait(job.id, timeout=600)
        report = done.result
    v = report["verdicts"]
    assert v == {"baseline_equal": True, "patch_selection_equal": True, "patch_digest_equal": True,
                 "after_equal": True, "any_output_changed": True}, report
    assert report["ok"] and report["trainer_engine_baseline_equal"]
    assert report["sparse_payload_mb"] < 0.01 * report["dense_payload_mb"]
    assert report["dense"]["verified"] and report["sparse"]["verified"]
    # Engines answer exactly as the trainer after each sync.
    assert report["dense"]["after"] == report["dense"]["trainer_after"]
    assert report["sparse"]["after"] == report["sparse"]["trainer_after"]


def test_training_loop_syncs(service):
    """What a training loop does: dense seed, then sparse steps into two engines, each verified."""
    with Client(service.url, timeout=120) as c:
        c.trainer.load()
        engines = [c.engines.launch(kind="reference").id for _ in range(2)]
        assert c.wait(c.sync.dense(engines).id, timeout=300).result["verified"]
        for step in range(3):
            patch = c.patches.prepare(kind="random", density=0.001, seed=step)
            res = c.wait(c.sync.sparse(engines, patch_id=patch.id, encoding="auto").id, timeout=300).result
            assert res["verified"] and res["version"] == patch.id
            assert res["payload_bytes"] == patch.payload_bytes
        # Stale patch: refused with 409 naming the rule, nothing lost.
        stale = c.patches.list().items[-1]
        with pytest.raises(ConflictError) as err:
            c.sync.sparse(engines, patch_id=stale.id)
        assert err.value.rule == "baseline_match"
        with pytest.raises(UnprocessableEntityError) as bad:
            c.sync.sparse(engines, patches=[{"name": "model.norm.weight", "indices": [1, 1], "values": [0.0, 1.0]}])
        assert bad.value.rule == "indices_unique" and bad.value.field == "patches.0.indices"
        # A real optimizer step, then a delta sync: only what the step changed goes over the wire.
        res = c.wait(c.sync.dense(engines).id, timeout=300).result  # seeds the trainer's snapshot
        step = c.trainer.step(optimizer="adamw", lr=1e-5)
        delta = c.wait(c.sync.sparse(engines, delta=True, encoding="auto").id, timeout=300).result
        assert delta["verified"] and delta["version"] == step.version
        assert 0 < delta["changed_fraction"] < 1 and delta["wire_bytes"] < res["wire_bytes"]
        for e in engines:
            c.engines.delete(e)


def test_results_survive_a_restart(service, db_path):
    with Client(service.url) as c:
        before = c.results.list(limit=200)
    assert before.total >= 5
    service.stop()
    log = (db_path.parent / "server.log").read_text(errors="replace")  # written where we asked, as it ran
    assert service.log_path == db_path.parent / "server.log" and "/v1/results" in log
    again = start_service(db_path)
    try:
        with Client(again.url) as c:
            after = c.results.list(limit=200)
            comparisons = c.results.list(kind="comparison")
    finally:
        again.stop()
    assert [r.id for r in after.items] == [r.id for r in before.items]
    assert comparisons.total >= 1 and comparisons.items[0].data["ok"] is True
