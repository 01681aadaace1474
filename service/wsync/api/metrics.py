"""``GET /metrics``: Prometheus text format (prometheus-client), one registry per app.

Fed by the event bus: ``sync.finished`` (a SyncReport dict) and ``comparison.finished`` (its dense and
sparse phases) observe the sync histograms and byte counters, labelled by mode, transport and engine
kind (from the report's ``engines[]`` entries / ``transport`` when present, else the engine's record,
else ``unknown``). ``trainer.version`` events (and every sync's version) extend the version ledger.
Jobs by state, engines by state and versions behind are read at scrape time.

Metric names: wsync_sync_duration_seconds (histogram), wsync_sync_wire_bytes_per_sync (histogram),
wsync_sync_wire_bytes_total, wsync_sync_payload_bytes_total, wsync_syncs_total,
wsync_verification_failures_total, wsync_jobs{state}, wsync_engines{state,kind},
wsync_engine_versions_behind{engine_id,kind}, wsync_events_total{kind}.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from wsync.jobs.events import Event, EventBus
from wsync.schemas import JobState

log = logging.getLogger("wsync.metrics")
router = APIRouter(tags=["ops"])

_LABELS = ("mode", "transport", "engine_kind")
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BYTES = tuple(float(2 ** p) for p in range(10, 38, 2))  # 1 KiB .. 128 GiB


class VersionLedger:
    """Trainer versions in the order they appeared; versions behind = how many came after an engine's."""

    def __init__(self, limit: int = 10000) -> None:
        self._order: dict[str, int] = {}
        self._limit = limit
        self._guard = threading.Lock()

    def add(self, version: str | None) -> None:
        if not version:
            return
        with self._guard:
            if version not in self._order and len(self._order) < self._limit:
                self._order[version] = len(self._order)

    def behind(self, engine_version: str | None, trainer_version: str | None) -> int | None:
        with self._guard:
            if engine_version not in self._order or trainer_version not in self._order:
                return None
            return max(0, self._order[trainer_version] - self._order[engine_version])


class Metrics:
    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.registry = CollectorRegistry(auto_describe=True)
        self.ledger = VersionLedger()
        r = self.registry
        self.duration = Histogram("wsync_sync_duration_seconds", "End-to-end sync time (job start to every "
                                  "engine serving the weights).", _LABELS, buckets=_SECONDS, registry=r)
        self.wire_hist = Histogram("wsync_sync_wire_bytes_per_sync", "Bytes broadcast per sync.", _LABELS,
                                   buckets=_BYTES, registry=r)
        self.wire = Counter("wsync_sync_wire_bytes", "Bytes broadcast by syncs.", _LABELS, registry=r)
        self.payload = Counter("wsync_sync_payload_bytes", "Tensor bytes carried by syncs.", _LABELS, registry=r)
        self.syncs = Counter("wsync_syncs", "Finished syncs.", _LABELS, registry=r)
        self.verify_fail = Counter("wsync_verification_failures", "Syncs whose fingerprints did not match.",
                                   _LABELS, registry=r)
        self.events = Counter("wsync_events", "Events published on the bus.", ("kind",), registry=r)
        r.register(_ScrapeCollector(self))

    # -- bus listener -------------------------------------------------------------------------
    def on_event(self, ev: Event) -> None:
        self.events.labels(ev.kind).inc()
        if ev.kind == "sync.finished":
            self.observe_sync(ev.data)
        elif ev.kind == "comparison.finished":
            for mode in ("dense", "sparse"):
                phase = ev.data.get(mode)
                if isinstance(phase, dict):
                    engine = {"engine_id": phase.get("engine_id"), "kind": ev.data.get("engine_kind")}
                    self.observe_sync({**phase, "mode": mode, "engines": [engine]})
        elif ev.kind == "trainer.version":
            self.ledger.add(ev.data.get("version"))

    def observe_sync(self, rep: dict[str, Any]) -> None:
        mode = str(rep.get("mode") or "unknown")
        self.ledger.add(rep.get("version"))
        known = {e["id"]: e for e in _fleet_view(self.app)[0]}
        groups = set()
        for eng in rep.get("engines") or [{}]:
            rec = known.get(eng.get("engine_id"), {})
            kind = eng.get("kind") or rec.get("kind") or "unknown"
            transport = eng.get("transport") or rep.get("transport") or (rec.get("details") or {}).get("transport")
            groups.add((str(kind), str(transport or "unknown")))
        failed = rep.get("verified") is False or any(e.get("fingerprint_equal") is False
                                                     for e in rep.get("engines") or [])
        for kind, transport in groups:
            labels = (mode, transport, kind)
            self.duration.labels(*labels).observe(float(rep.get("total_ms") or 0.0) / 1e3)
            self.wire_hist.labels(*labels).observe(float(rep.get("wire_bytes") or 0))
            self.wire.labels(*labels).inc(float(rep.get("wire_bytes") or 0))
            self.payload.labels(*labels).inc(float(rep.get("payload_bytes") or 0))
            self.syncs.labels(*labels).inc()
            if failed:
                self.verify_fail.labels(*labels).inc()


class _ScrapeCollector:
    """Gauges read at scrape time: jobs by state, engines by state, versions behind."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        jobs = GaugeMetricFamily("wsync_jobs", "Jobs in the database by state.", labels=["state"])
        state = getattr(self.m.app.state, "wsync", None)
        if state is not None:
            for st in JobState:
                _, total = state.store.list_jobs(state=st, limit=1)
                jobs.add_metric([st.value], total)
        yield jobs
        engines, trainer_version = _fleet_view(self.m.app)
        by_state = GaugeMetricFamily("wsync_engines", "Engines by state and kind.", labels=["state", "kind"])
        counts: dict[tuple[str, str], int] = {}
        for e in engines:
            key = (str(e.get("state")), str(e.get("kind")))
            counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            by_state.add_metric(list(key), n)
        yield by_state
        behind = GaugeMetricFamily("wsync_engine_versions_behind", "Trainer versions an engine is behind "
                                   "(only where both versions were seen by this process).",
                                   labels=["engine_id", "kind"])
        self.m.ledger.add(trainer_version)
        for e in engines:
            n = self.m.ledger.behind(e.get("version"), trainer_version)
            if n is not None:
                behind.add_metric([str(e.get("id")), str(e.get("kind"))], n)
        yield behind


def _fleet_view(app: FastAPI) -> tuple[list[dict], str | None]:
    """(engines as dicts, trainer version) from the app's fleet; the one place that reads the sync
    layer (adjust here when it moves)."""
    state = getattr(app.state, "wsync", None)
    fleet = getattr(state, "fleet", None)
    if fleet is None:
        return [], None
    try:
        engines = [e.model_dump(mode="json") for e in fleet.list_engines()]
        info = getattr(fleet, "trainer_info", None) or {}
        return engines, info.get("version")
    except Exception:  # a fleet mid-change must not break a scrape
        log.exception("reading the fleet for metrics failed")
        return [], None


def install(app: FastAPI, bus: EventBus) -> Metrics:
    metrics = Metrics(app)
    bus.subscribe(metrics.on_event)
    app.state.metrics = metrics
    app.include_router(router)
    return metrics


@router.get("/metrics", summary="Prometheus metrics (text exposition format)", operation_id="metrics",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
