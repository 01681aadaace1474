"""The OpenAPI spec: every 4xx references the real error envelope, no FastAPI validation schema is
left, operation ids are the stable names of the route functions, lists page."""

from __future__ import annotations

from wsync.api.app import create_app
from wsync.settings import Settings

EXPECTED_IDS = {
    ("post", "/v1/engines"): "launch_engine", ("get", "/v1/engines"): "list_engines",
    ("get", "/v1/engines/{engine_id}"): "get_engine", ("delete", "/v1/engines/{engine_id}"): "delete_engine",
    ("post", "/v1/engines/{engine_id}/generate"): "generate_on_engine",
    ("get", "/v1/trainer"): "get_trainer", ("post", "/v1/trainer/load"): "load_trainer",
    ("post", "/v1/trainer/reset"): "reset_trainer", ("post", "/v1/trainer/step"): "step_trainer",
    ("post", "/v1/patches"): "prepare_patch", ("get", "/v1/patches"): "list_patches",
    ("get", "/v1/patches/{patch_id}"): "get_patch", ("post", "/v1/sync/dense"): "sync_dense",
    ("post", "/v1/sync/sparse"): "sync_sparse", ("post", "/v1/comparisons"): "create_comparison",
    ("get", "/v1/jobs"): "list_jobs", ("get", "/v1/jobs/{job_id}"): "get_job",
    ("post", "/v1/jobs/{job_id}/cancel"): "cancel_job", ("get", "/v1/results"): "list_results",
    ("get", "/v1/results/{result_id}"): "get_result", ("get", "/v1/events"): "stream_events",
    ("get", "/v1/jobs/{job_id}/events"): "stream_job_events", ("get", "/metrics"): "metrics",
    ("get", "/livez"): "livez", ("get", "/readyz"): "readyz",
}


def _spec():
    return create_app(Settings(database_url="sqlite://"), start_fleet=False).openapi()


def _ops(spec):
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            yield path, method, op


def test_every_4xx_references_the_error_envelope():
    spec = _spec()
    seen = set()
    for path, method, op in _ops(spec):
        for code, resp in op["responses"].items():
            if code.startswith("4") or code in ("503",) and path != "/readyz":
                schema = resp["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
                seen.add(code)
    assert {"400", "401", "403", "404", "409", "413", "422", "503"} <= seen
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["ErrorBody"]["properties"]["error"] == {"$ref": "#/components/schemas/ErrorDetail"}
    assert "HTTPValidationError" not in str(spec)


def test_statuses_where_they_occur():
    paths = _spec()["paths"]
    assert {"404", "409", "400", "503", "422"} <= set(paths["/v1/engines/{engine_id}"]["delete"]["responses"])
    assert "404" not in paths["/v1/engines"]["get"]["responses"]
    assert {"409", "413", "422"} <= set(paths["/v1/sync/dense"]["post"]["responses"])
    assert set(paths["/livez"]["get"]["responses"]) == {"200"}


def test_operation_ids_are_stable_names():
    ids = {(m, p): op["operationId"] for p, m, op in _ops(_spec())}
    assert {k: ids.get(k) for k in EXPECTED_IDS} == EXPECTED_IDS
    assert len(set(ids.values())) == len(ids)


def test_lists_take_limit_and_offset():
    paths = _spec()["paths"]
    for path in ("/v1/engines", "/v1/jobs", "/v1/patches", "/v1/results"):
        names = {p["name"] for p in paths[path]["get"]["parameters"]}
        assert {"limit", "offset"} <= names, path
