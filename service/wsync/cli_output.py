"""Output helpers of the `wsync` command line: tables, JSON, job summaries, following a job."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from wsync.schemas import JobInfo, JobKind, SyncReport
from wsync_client import Client, report_of

from .cli_follow import Display
from .report import format_report

_MB = 1024 * 1024


# -- output helpers ---------------------------------------------------------------------------------

def _out(text: str = "") -> None:
    print(text, file=sys.stdout, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _json(obj: Any) -> None:
    _out(obj.model_dump_json(indent=2) if isinstance(obj, BaseModel) else json.dumps(obj, indent=2, default=str))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if hasattr(value, "isoformat"):
        return value.isoformat(timespec="seconds")
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(getattr(value, "value", value))


def _table(rows: Sequence[Any], columns: Sequence[str]) -> str:
    grid = [[c.upper() for c in columns]] + [[_cell(getattr(r, c, None)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in grid)


def _fields(obj: BaseModel, skip: Sequence[str] = ()) -> str:
    data = {k: getattr(obj, k) for k in type(obj).model_fields if k not in skip}
    width = max(len(k) for k in data)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in data.items())


def _show(args: argparse.Namespace, obj: BaseModel, human: Callable[[], str]) -> int:
    _out(obj.model_dump_json(indent=2) if args.json else human())
    return 0


def _sync_summary(job: JobInfo) -> str:
    rep = SyncReport.model_validate(job.result)
    lines = [f"{rep.mode} sync -> version {rep.version}: {rep.tensors} tensors, "
             f"payload {rep.payload_bytes / _MB:.2f} MB, wire {rep.wire_bytes / _MB:.2f} MB, "
             f"send {rep.send_ms:.2f} ms, total {rep.total_ms:.2f} ms, verified={rep.verified}"]
    if rep.encoding:
        lines[0] += f", encoding={rep.encoding}"
    if rep.engines:
        lines.append(_table(rep.engines, ["engine_id", "version", "recv_ms", "fingerprint_equal"]))
    return "\n".join(lines)


def _job_text(job: JobInfo) -> str:
    text = _fields(job, skip=("result", "request", "events"))
    if job.result and job.state.value == "succeeded":
        try:
            body = format_report(report_of(job)) if job.kind == JobKind.comparison else _sync_summary(job)
        except Exception:  # an unexpected result shape: show it raw
            body = json.dumps(job.result, indent=2, default=str)
        text += "\n\n" + body
    return text


def _follow(args: argparse.Namespace, c: Client, job: JobInfo) -> JobInfo:
    """Wait for a job through its event stream, showing progress (see cli_follow)."""
    follow = getattr(args, "follow", False)
    with Display(job.id, json_mode=args.json, follow=follow) as display:
        return c.jobs.follow(job.id, timeout=args.timeout, on_event=display.on_event)


# -- commands ---------------------------------------------------------------------------------------

