"""Bad input: one test per validation rule; each answers 4xx naming the field and the rule, and
nothing already stored changes."""

import json

import pytest

from .conftest import wait_job

NORM = "model.norm.weight"  # bfloat16 [256]


@pytest.fixture(scope="module")
def setup(client):
    if not client.get("/v1/trainer").json()["loaded"]:
        client.post("/v1/trainer/load", json={})
    engine = client.post("/v1/engines", json={"kind": "reference"}).json()["id"]
    # Make sure at least one stored result exists to watch over.
    done = wait_job(client, client.post("/v1/sync/dense", json={"engine_ids": [engine]}).json()["id"])
    assert done["state"] == "succeeded"
    return engine


def snapshot(client):
    return (client.get("/v1/results", params={"limit": 200}).json(),
            client.get("/v1/patches", params={"limit": 200}).json()["total"],
            client.get("/v1/jobs", params={"limit": 200}).json()["total"],
            client.get("/v1/trainer").json()["version"])


def post(client, url, body):
    """Send JSON as Python writes it (NaN allowed), as a sloppy client would."""
    return client.post(url, content=json.dumps(body), headers={"content-type": "application/json"})


def patch(**over):
    base = {"name": NORM, "indices": [0, 1], "values": [1.0, 2.0]}
    base.update(over)
    return base


CASES = [
    ("name_exists", patch(name="model.nope.weight"), "patches.0.name"),
    ("dtype_match", patch(dtype="float32"), "patches.0.dtype"),
    ("shape_match", patch(shape=[128]), "patches.0.shape"),
    ("indices_int32", patch(index_dtype="int64"), "patches.0.index_dtype"),
    ("indices_int32", patch(indices=[0, 2**31]), "patches.0.indices"),
    ("indices_in_range", patch(indices=[0, 256]), "patches.0.indices"),
    ("indices_in_range", patch(indices=[-1, 3]), "patches.0.indices"),
    ("indices_unique", patch(indices=[4, 4]), "patches.0.indices"),
    ("values_finite", patch(values=[1.0, float("nan")]), "patches.0.values"),
    ("values_finite", patch(values=[1.0, 1e300]), "patches.0.values"),
    ("lengths_equal", patch(values=[1.0]), "patches.0.values"),
]


@pytest.mark.parametrize("rule,bad,field", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("route", ["sync", "patch"])
def test_validation_rule(client, setup, rule, bad, field, route):
    before = snapshot(client)
    if route == "sync":
        r = post(client, "/v1/sync/sparse", {"engine_ids": [setup], "patches": [bad]})
    else:
        r = post(client, "/v1/patches", {"kind": "inline", "patches": [bad]})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["rule"] == rule and err["field"] == field
    assert rule.split("_")[0] in err["message"] or field in err["message"]
    assert err["request_id"] == r.headers["X-Request-ID"]
    assert snapshot(client) == before


def test_duplicate_tensor(client, setup):
    before = snapshot(client)
    r = client.post("/v1/sync/sparse", json={"engine_ids": [setup], "patches": [patch(), patch()]})
    assert r.status_code == 422 and r.json()["error"]["rule"] == "duplicate_tensor"
    assert r.json()["error"]["field"] == "patches.1.name"
    assert snapshot(client) == before


def test_indices_must_be_flat(client, setup):
    before = snapshot(client)
    r = client.post("/v1/sync/sparse", json={"engine_ids": [setup], "patches": [patch(indices=[[0, 1]])]})
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("patches.0.indices")
    assert snapshot(client) == before


@pytest.mark.parametrize("body,status,field", [
    ({"engine_ids": ["e-missing"], "patch_id": "p-x"}, 404, "engine_ids.0"),
    ({"engine_ids": [], "patch_id": "p-x"}, 422, "engine_ids"),
    ({"engine_ids": ["ENGINE"]}, 422, None),
    ({"engine_ids": ["ENGINE"], "patch_id": "p-missing"}, 404, "patch_id"),
    ({"engine_ids": ["ENGINE", "ENGINE"], "patch_id": "p-x"}, 422, "engine_ids"),
    ({"engine_ids": ["ENGINE"], "patch_id": "p-x", "encoding": "zip"}, 422, "encoding"),
    ({"engine_ids": ["ENGINE"], "patch_id": "p-x", "surprise": 1}, 422, "surprise"),
])
def test_sync_request_errors(client, setup, body, status, field):
    before = snapshot(client)
    body = {k: ([setup if e == "ENGINE" else e for e in v] if k == "engine_ids" else v) for k, v in body.items()}
    r = client.post("/v1/sync/sparse", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
    assert snapshot(client) == before


@pytest.mark.parametrize("body,field", [
    ({"kind": "random"}, None),
    ({"kind": "random", "density": 1.5}, "density"),
    ({"kind": "reference", "rows": 0}, "rows"),
    ({"kind": "reference", "param": "model.nope"}, "param"),
    ({"kind": "random", "density": 0.1, "params": ["model.nope"]}, "params.0"),
])
def test_patch_request_errors(client, setup, body, field):
    before = snapshot(client)
    r = client.post("/v1/patches", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    assert snapshot(client) == before


def test_engine_launch_errors(client, setup):
    r = client.post("/v1/engines", json={"kind": "vllm"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "kind"
    r = client.post("/v1/engines", json={"kind": "tpu"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "kind"
    r = client.post("/v1/engines", json={"kind": "vllm", "sync_route": "fastest"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "sync_route"
