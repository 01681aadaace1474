"""End to end: the service as a real process (uvicorn), real Ray, real gloo groups, the tiny model."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    def __init__(self, db: Path, log: Path):
        self.db, self.log, self.port, self.proc = db, log, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> "ServiceProcess":
        env = dict(os.environ, WSYNC_DATABASE_URL=f"sqlite:///{self.db}", WSYNC_RAY_NUM_CPUS="2",
                   WSYNC_DEVICE="cpu", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "wsync", "serve", "--port", str(self.port)],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"service not ready in {timeout}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def service_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    return d / "wsync.db", d / "service.log"


@pytest.fixture(scope="module")
def service(service_paths):
    svc = ServiceProcess(*service_paths).start()
    yield svc
    svc.stop()
