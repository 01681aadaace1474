"""`wsync serve` as a real process (uvicorn + Ray): SIGTERM shuts it down cleanly (exit 0, no stack
dump), and LocalServer leaves no temp dir behind."""

from __future__ import annotations

from wsync_client.local import LocalServer


def test_sigterm_exits_0_without_a_traceback_and_no_temp_dir_is_left(tmp_path):
    log = tmp_path / "server.log"
    env = {"WSYNC_RAY_NUM_CPUS": "1", "WSYNC_DEVICE": "cpu", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    server = LocalServer(env=env, ready_timeout=240, log_path=log)
    with server:
        assert server.dir.is_dir()
    text = log.read_text(errors="replace")
    assert server.proc is not None and server.proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "Application shutdown complete" in text
    assert not server.dir.exists()
