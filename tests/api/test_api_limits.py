"""Limits refused with 413/409/422 naming the setting (no Ray: start_fleet=False)."""

import json

import pytest
from fastapi.testclient import TestClient

from wsync.api.app import create_app
from wsync.settings import Settings


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db = tmp_path_factory.mktemp("limits") / "wsync.db"
    settings = Settings(database_url=f"sqlite:///{db}", device="cpu", max_body_bytes=4096, max_engines=2,
                        max_patch_elements=8)
    with TestClient(create_app(settings, start_fleet=False), raise_server_exceptions=False) as c:
        yield c


def _inline(n):
    return {"kind": "inline",
            "patches": [{"name": "model.norm.weight", "indices": list(range(n)), "values": [0.5] * n}]}


def test_a_body_over_max_body_bytes_is_413_by_content_length(client):
    r = client.post("/v1/patches", content=b"{" + b" " * 5000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["rule"] == "max_body_bytes" and "max_body_bytes=4096" in err["message"] and err["request_id"]


def test_a_chunked_body_over_max_body_bytes_is_413_while_reading(client):
    def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = client.post("/v1/sync/sparse", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["rule"] == "max_body_bytes"


def test_a_body_under_the_limit_still_reaches_the_app(client):
    r = client.post("/v1/patches", content=json.dumps(_inline(2)), headers={"content-type": "application/json"})
    assert r.status_code == 409 and r.json()["error"]["field"] == "trainer"  # parsed, then: no model loaded


@pytest.mark.parametrize("path", ["/v1/patches", "/v1/sync/sparse"])
def test_too_many_patch_elements_is_422_naming_the_limit(client, path):
    body = _inline(9) if path == "/v1/patches" else {"engine_ids": ["e-1"], "patches": _inline(9)["patches"]}
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "patches" and err["rule"] == "max_patch_elements"
    assert "max_patch_elements=8" in err["message"]


def test_one_engine_more_than_max_engines_is_409(client):
    fleet = client.app.state.wsync.fleet
    fleet.engines.update({"e-a": object(), "e-b": object()})
    try:
        r = client.post("/v1/engines", json={"kind": "reference"})
        assert r.status_code == 409
        err = r.json()["error"]
        assert err["field"] == "max_engines" and "max_engines=2" in err["message"]
    finally:
        fleet.engines.clear()


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/engines/e-x/generate", {"prompts": [""]}, "prompts.0"),
    ("/v1/trainer/step", {"texts": ["ok", ""]}, "texts.1"),
    ("/v1/comparisons", {"prompts": [""]}, "prompts.0"),
    ("/v1/patches", {"kind": "reference", "prompts": [""]}, "prompts.0"),
])
def test_empty_text_is_a_422_naming_the_field(client, path, body, field):
    """Was an internal reshape message from the engine (an empty prompt has no tokens)."""
    r = client.post(path, json=body)
    assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text


def test_a_random_patch_over_max_patch_elements_is_422(client):
    from wsync.schemas import TrainerInfo
    from wsync.sync.records import TrainerRecord
    from wsync.transfer.meta import TensorMeta

    trainer = client.app.state.wsync.fleet.trainer  # a loaded trainer of one 64x64 tensor, as the checks see it
    trainer.record = TrainerRecord(info=TrainerInfo(loaded=True), params=[TensorMeta("w", "float32", [64, 64])])
    try:
        r = client.post("/v1/patches", json={"kind": "random", "density": 0.01})
        assert r.status_code == 422 and r.json()["error"]["field"] == "density", r.text
        assert "max_patch_elements=8" in r.json()["error"]["message"]
    finally:
        trainer.record = TrainerRecord()
