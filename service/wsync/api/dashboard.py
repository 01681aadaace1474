"""The operator's dashboard at ``/`` and Swagger UI at ``/docs``, both from local assets (no CDN).

``/`` is rendered on the server (engines, trainer, recent jobs, comparison verdicts, and the recent
sync reports embedded as JSON for the plots); ``static/dashboard.js`` then draws the plots with the
vendored uPlot and keeps everything live from ``GET /v1/events`` (EventSource). Static files live in
``wsync/api/static`` (package data) and are served under ``/static``.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from wsync import __version__
from wsync.schemas import JobKind

from .metrics import _fleet_view

STATIC = Path(__file__).parent / "static"
router = APIRouter(include_in_schema=False)
HISTORY = 200  # sync reports embedded for the plots


def install(app: FastAPI) -> None:
    """Mount /static and add / and /docs (create the app with ``docs_url=None``)."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(router)


@router.get("/docs", response_class=HTMLResponse)
def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=request.app.openapi_url or "/openapi.json", title="wsync API",
                               swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
                               swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css",
                               swagger_favicon_url="/static/favicon.svg")


def sync_points(results: list[Any]) -> list[dict]:
    """Plot points, oldest first: one per sync (sync jobs, and the two phases of each comparison)."""
    points = []
    for res in reversed(results):
        data, at = res.data or {}, res.created_at.isoformat()
        if res.kind in (JobKind.sync_dense, JobKind.sync_sparse):
            points.append(_point(data, at, res.job_id))
        elif res.kind == JobKind.comparison:
            points += [_point({**data[m], "mode": m}, at, res.job_id) for m in ("dense", "sparse")
                       if isinstance(data.get(m), dict)]
    return points


def _point(rep: dict, at: str, job_id: str) -> dict:
    keys = ("mode", "total_ms", "wire_bytes", "payload_bytes", "changed_fraction", "verified", "encoding")
    return {"at": at, "job_id": job_id, **{k: rep.get(k) for k in keys}}


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request) -> HTMLResponse:
    state = request.app.state.wsync
    engines, _ = _fleet_view(request.app)
    trainer = {k: v for k, v in (getattr(state.fleet, "trainer_info", None) or {}).items() if k != "params"}
    jobs, _ = state.store.list_jobs(limit=20)
    results, _ = state.store.list_results(limit=HISTORY)
    comparisons = [r for r in results if r.kind == JobKind.comparison][:10]
    initial = {"points": sync_points(results), "last_event_id": request.app.state.events.last_id}
    return HTMLResponse(PAGE.format(
        version=escape(__version__), engines=_engines_rows(engines), trainer=_trainer_rows(trainer),
        jobs="".join(_job_row(j.model_dump(mode="json")) for j in jobs), comparisons=_comparison_rows(comparisons),
        initial=json.dumps(initial, default=str).replace("</", "<\\/")))


def _td(value: Any) -> str:
    return f"<td>{escape('-' if value is None else str(value))}</td>"


def _engines_rows(engines: list[dict]) -> str:
    rows = []
    for e in engines:
        d = e.get("details") or {}
        rows.append(f'<tr data-engine="{escape(e["id"])}">' + "".join(_td(v) for v in (
            e["id"], e.get("kind"), d.get("gpu") or e.get("device"), d.get("transport") or d.get("sync_route"),
            e.get("version"), e.get("state"), e.get("syncs"))) + "</tr>")
    return "".join(rows) or '<tr class="empty"><td colspan="7">no engines</td></tr>'


def _trainer_rows(info: dict) -> str:
    if not info.get("loaded"):
        return '<tr class="empty"><td colspan="2">no model loaded</td></tr>'
    keys = ("model", "dtype", "device", "version", "num_params", "num_tensors")
    return "".join(f"<tr><th>{k}</th>{_td(info.get(k))}</tr>" for k in keys)


def _job_row(j: dict) -> str:
    return (f'<tr data-job="{escape(j["id"])}">' + "".join(_td(j.get(k)) for k in
            ("id", "kind", "state", "created_at", "finished_at")) + _td((j.get("error") or "")[:120]) + "</tr>")


def _comparison_rows(results: list[Any]) -> str:
    rows = []
    for r in results:
        v = (r.data or {}).get("verdicts") or {}
        bad = [k for k, ok in v.items() if not ok]
        verdict = "PASS" if (r.data or {}).get("ok") else "FAIL " + ", ".join(bad)
        rows.append(f'<tr data-job="{escape(r.job_id)}">' + _td(r.created_at.isoformat(timespec="seconds"))
                    + _td(r.job_id) + _td((r.data or {}).get("engine_kind")) + _td(verdict) + "</tr>")
    return "".join(rows) or '<tr class="empty"><td colspan="4">no comparisons yet</td></tr>'


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wsync</title>
<link rel="icon" href="/static/favicon.svg">
<link rel="stylesheet" href="/static/vendor/uplot/uPlot.min.css">
<link rel="stylesheet" href="/static/dashboard.css">
</head><body>
<header><h1>wsync</h1><span class="muted">v{version}</span>
<span id="live" class="badge">connecting</span>
<nav><a href="/docs">API docs</a> <a href="/metrics">metrics</a></nav></header>
<main>
<section><h2>Engines</h2><table id="engines"><thead><tr><th>id</th><th>kind</th><th>GPU</th><th>transport</th>
<th>version</th><th>state</th><th>syncs</th></tr></thead><tbody>{engines}</tbody></table></section>
<section><h2>Trainer</h2><table id="trainer"><tbody>{trainer}</tbody></table></section>
<section class="wide"><h2>Sync history</h2><div class="plots">
<figure><figcaption>end-to-end ms per sync</figcaption><div id="plot-ms"></div></figure>
<figure><figcaption>wire MB per sync</figcaption><div id="plot-bytes"></div></figure>
<figure><figcaption>delta density (changed fraction)</figcaption><div id="plot-density"></div></figure>
</div>
<table id="syncs"><thead><tr><th>finished</th><th>job</th><th>mode</th><th>ms</th><th>wire MB</th><th>GB/s</th>
<th>verified</th></tr></thead><tbody></tbody></table></section>
<section class="wide"><h2>Jobs</h2><table id="jobs"><thead><tr><th>id</th><th>kind</th><th>state</th><th>created</th>
<th>finished</th><th>error</th></tr></thead><tbody>{jobs}</tbody></table></section>
<section class="wide"><h2>Comparisons</h2><table id="comparisons"><thead><tr><th>finished</th><th>job</th>
<th>engine kind</th><th>verdict</th></tr></thead><tbody>{comparisons}</tbody></table></section>
</main>
<script id="initial" type="application/json">{initial}</script>
<script src="/static/vendor/uplot/uPlot.iife.min.js"></script>
<script src="/static/dashboard.js"></script>
</body></html>
"""
