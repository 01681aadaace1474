"""What the CLI shows while it waits for a job (`--wait`, `--follow`), fed by the job's event stream.

- `--wait` on a terminal: a rich progress bar on stderr (phase, bytes when the job reports
  ``bytes_done``/``bytes_total``, elapsed time); not a terminal: one line per state change / message.
- `--follow`: every event as a line on stdout (`--json`: one JSON object per line).
- `--json` without `--follow`: nothing while waiting (stdout stays one JSON document).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from wsync_client import ServerEvent

OnEvent = Callable[[ServerEvent], None]


def _describe(ev: ServerEvent) -> str | None:
    if ev.kind in ("job.state", "job.snapshot"):
        return ev.data.get("state")
    if ev.kind == "job.event":
        return ev.data.get("message")
    if ev.kind == "sync.finished":
        return f"{ev.data.get('mode')} sync finished in {ev.data.get('total_ms', 0):.1f} ms"
    return ev.kind


class Display:
    """Context manager owning the progress display; `on_event` is what `jobs.follow` calls."""

    def __init__(self, job_id: str, *, json_mode: bool, follow: bool, stream: Any = None) -> None:
        self.job_id, self.json_mode, self.follow = job_id, json_mode, follow
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self._progress: Any = None
        self._task: Any = None
        self._last_state: str | None = None

    def __enter__(self) -> Display:
        if not self.json_mode and not self.follow and _is_tty(self.stream):
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("[bold]{task.fields[job]}"), TextColumn("{task.description}"),
                                      BarColumn(), TextColumn("{task.fields[amount]}"), TimeElapsedColumn(),
                                      console=Console(file=self.stream), transient=False)
            self._progress.start()
            self._task = self._progress.add_task("waiting", total=None, job=self.job_id, amount="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def on_event(self, ev: ServerEvent) -> None:
        if self.follow:
            if self.json_mode:
                print(json.dumps(ev.to_dict(), default=str), flush=True)
            else:
                text = _describe(ev)
                print(f"{time.monotonic() - self.t0:7.2f}s [{ev.job_id or self.job_id}] {ev.kind}: {text}", flush=True)
            return
        if self.json_mode:
            return
        if self._progress is not None:
            self._update_bar(ev)
            return
        if ev.kind in ("job.state", "job.snapshot"):
            state = ev.data.get("state")
            if state != self._last_state:
                self._last_state = state
                self._line(f"[{self.job_id}] {state}")
        elif ev.kind == "job.event":
            self._line(f"[{self.job_id}] {ev.data.get('message', '')}")

    def _update_bar(self, ev: ServerEvent) -> None:
        done, total = ev.data.get("bytes_done"), ev.data.get("bytes_total")
        fields: dict[str, Any] = {}
        if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
            fields.update(completed=done, total=total, amount=f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB")
        if ev.terminal and "total" not in fields:
            fields.update(completed=1, total=1)
        text = _describe(ev)
        if text:
            fields["description"] = text
        self._progress.update(self._task, **fields)

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False
