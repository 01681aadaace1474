"""WSYNC_API_TOKEN over a real server: 401 without, 403 wrong, reads open unless guarded, OpenAPI, serve."""

from __future__ import annotations

import httpx
import pytest

from wsync import cli
from wsync.api.auth import is_loopback
from wsync_client import AuthenticationError, Client, PermissionDeniedError
from wsync_client.local import free_port

from .conftest import ThreadServer, make_app

TOKEN = "s3cret-token"


@pytest.fixture
def guarded(tmp_path):
    with ThreadServer(make_app(tmp_path, api_token=TOKEN), free_port()) as srv:
        yield srv


def test_mutating_routes_need_the_token(guarded):
    url = f"{guarded.url}/v1/jobs/job-x/cancel"
    r = httpx.post(url)
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert r.json()["error"]["field"] == "Authorization"
    r = httpx.post(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
    r = httpx.post(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404  # past the guard: the job does not exist
    assert httpx.get(f"{guarded.url}/v1/jobs").status_code == 200  # reads stay open
    assert httpx.get(f"{guarded.url}/livez").status_code == 200


def test_reads_guarded_when_asked(tmp_path):
    with ThreadServer(make_app(tmp_path, api_token=TOKEN, api_token_reads=True), free_port()) as srv:
        assert httpx.get(f"{srv.url}/v1/jobs").status_code == 401
        assert httpx.get(f"{srv.url}/livez").status_code == 200
        with Client(srv.url, api_token=TOKEN) as c:
            assert c.jobs.list().total == 0


def test_sdk_reads_the_env_token_and_maps_401_403(guarded, monkeypatch):
    monkeypatch.delenv("WSYNC_API_TOKEN", raising=False)
    with Client(guarded.url, max_retries=0) as c, pytest.raises(AuthenticationError):
        c.jobs.cancel("job-x")
    with Client(guarded.url, api_token="nope", max_retries=0) as c, pytest.raises(PermissionDeniedError):
        c.jobs.cancel("job-x")
    monkeypatch.setenv("WSYNC_API_TOKEN", TOKEN)
    code = cli.main(["job", "job-x", "--cancel", "--url", guarded.url])
    assert code == 2  # 404, not 401: the env token was sent


def test_openapi_documents_401_and_403_on_mutating_routes(guarded):
    spec = httpx.get(f"{guarded.url}/openapi.json").json()
    op = spec["paths"]["/v1/sync/dense"]["post"]
    assert {"401", "403"} <= set(op["responses"]) and op.get("security")
    assert "401" not in spec["paths"]["/livez"]["get"]["responses"]


def test_serve_refuses_a_public_host_without_a_token(monkeypatch, capsys):
    monkeypatch.delenv("WSYNC_API_TOKEN", raising=False)
    from wsync.settings import get_settings
    get_settings.cache_clear()
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "WSYNC_API_TOKEN" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
