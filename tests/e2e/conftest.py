"""End to end: the service as a real process (uvicorn), real Ray, real gloo groups, the tiny model."""

import pytest

from wsync_client.local import LocalServer


def start_service(db_path) -> LocalServer:
    env = {"WSYNC_DATABASE_URL": f"sqlite:///{db_path}", "WSYNC_RAY_NUM_CPUS": "2", "WSYNC_DEVICE": "cpu",
           "RAY_AUTH_MODE": "disabled"}
    server = LocalServer(env=env, ready_timeout=240, log_path=db_path.parent / "server.log")
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e") / "wsync.db"


@pytest.fixture(scope="module")
def service(db_path):
    server = start_service(db_path)
    yield server
    server.stop()
