"""`LocalServer`: run `python -m wsync serve` as a child process (for `wsync demo`, scripts and e2e tests).

    with LocalServer() as server:          # free port, private SQLite DB, log file in a temp dir
        with Client(server.url) as c:
            report = c.comparisons.run()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

from ._client import Client
from .errors import APIConnectionError, APIStatusError

__all__ = ["LocalServer", "ServerStartError", "free_port"]

READY_TIMEOUT_S = 300.0


class ServerStartError(RuntimeError):
    """The server died or did not become ready; `.log` holds the tail of its log."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """A wsync service child process. It inherits the environment; unless `WSYNC_DATABASE_URL` is set,
    it gets a private SQLite DB in its temp dir (so its start-up never marks another server's running
    jobs failed). stdout+stderr go to `log_path` (default: the temp dir), written as the server runs."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", env: Mapping[str, str] | None = None,
                 ready_timeout: float = READY_TIMEOUT_S,
                 client_factory: Callable[[str], Client] | None = None, log_path: str | Path | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.ready_timeout = ready_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="wsync-server-"))
        self._own_dir = True  # stop() removes it once the server is gone
        self.log_path = Path(log_path) if log_path is not None else self.dir / "server.log"
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("WSYNC_DATABASE_URL", f"sqlite:///{self.dir / 'wsync.db'}")
        self._factory = client_factory or (lambda url: Client(url))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    def start(self) -> "LocalServer":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsync", "serve", "--host", self.host, "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        return self

    def log_tail(self, lines: int = 200) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll GET /readyz every 0.5 s; ServerStartError if the process exits or time runs out."""
        assert self.proc is not None, "start() first"
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._factory(self.url) as c:
            probe = c.with_options(timeout=5.0, max_retries=0)
            while True:
                if self.proc.poll() is not None:
                    raise ServerStartError(f"wsync server exited with {self.proc.returncode} before ready",
                                           self.log_tail())
                try:
                    probe.ready()
                    return
                except (APIConnectionError, APIStatusError):
                    pass
                if time.monotonic() > deadline:
                    raise ServerStartError(f"wsync server not ready after {timeout:g} s", self.log_tail())
                time.sleep(0.5)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, then after `grace_s` SIGKILL to its session (the server and whatever it spawned);
        then remove the temp dir (private DB, log unless `log_path` put it elsewhere): read `log_tail()`
        before stopping if you need it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir and self.proc is not None and self.proc.poll() is not None:
            shutil.rmtree(self.dir, ignore_errors=True)  # its DB and log (a log_path given elsewhere stays)

    def __enter__(self) -> "LocalServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
