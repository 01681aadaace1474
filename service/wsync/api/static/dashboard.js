// wsync dashboard: plots (uPlot) from the server-rendered history, then live from GET /v1/events.
"use strict";
(function () {
  const initial = JSON.parse(document.getElementById("initial").textContent);
  const points = initial.points;  // one per sync, oldest first
  const COLORS = { dense: "#1f77b4", sparse: "#d62728" };
  const MB = 1024 * 1024;

  function text(v) { return v === null || v === undefined ? "-" : String(v); }
  function row(cells, attrs) {
    const tr = document.createElement("tr");
    for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
    for (const c of cells) { const td = document.createElement("td"); td.textContent = text(c); td.className = text(c).split(" ")[0]; tr.appendChild(td); }
    return tr;
  }
  function upsert(tableId, key, attr, cells, max) {
    const body = document.querySelector(`#${tableId} tbody`);
    body.querySelectorAll("tr.empty").forEach(e => e.remove());
    const tr = row(cells, { [attr]: key });
    tr.classList.add("flash");
    const old = body.querySelector(`tr[${attr}="${CSS.escape(key)}"]`);
    if (old) old.replaceWith(tr); else body.prepend(tr);
    while (max && body.children.length > max) body.lastChild.remove();
  }

  // ---- plots -----------------------------------------------------------------------------
  function seriesData(value) {
    const xs = points.map((_, i) => i + 1);
    const by = m => points.map(p => (p.mode === m && value(p) !== null && value(p) !== undefined) ? value(p) : null);
    return [xs, by("dense"), by("sparse")];
  }
  function makePlot(id, value, unit) {
    const el = document.getElementById(id);
    const opts = {
      width: 380, height: 200, scales: { x: { time: false } },
      axes: [{ label: "sync #" }, { label: unit }],
      series: [{ label: "sync" },
        { label: "dense", stroke: COLORS.dense, width: 2, spanGaps: true, points: { show: true, size: 7, fill: COLORS.dense } },
        { label: "sparse", stroke: COLORS.sparse, width: 2, spanGaps: true, points: { show: true, size: 7, fill: COLORS.sparse } }],
    };
    const plot = new uPlot(opts, seriesData(value), el);
    return () => plot.setData(seriesData(value));
  }
  const redraws = [
    makePlot("plot-ms", p => p.total_ms, "ms"),
    makePlot("plot-bytes", p => p.wire_bytes === null ? null : p.wire_bytes / MB, "MB"),
    makePlot("plot-density", p => p.changed_fraction, "fraction"),
  ];
  function syncRow(p) {
    const gbps = p.total_ms ? (p.wire_bytes / (p.total_ms / 1e3) / 1e9).toFixed(3) : null;
    upsert("syncs", `${p.job_id}:${p.mode}`, "data-sync",
      [p.at, p.job_id, p.mode, p.total_ms && p.total_ms.toFixed(1), (p.wire_bytes / MB).toFixed(2), gbps, p.verified], 50);
  }
  points.forEach(syncRow);
  function addPoint(p) { points.push(p); if (points.length > 500) points.shift(); redraws.forEach(f => f()); syncRow(p); }

  // ---- live ------------------------------------------------------------------------------
  async function refreshEngines() {
    try {
      const page = await (await fetch("/v1/engines")).json();
      const body = document.querySelector("#engines tbody");
      body.replaceChildren(...page.items.map(e => { const d = e.details || {};
        return row([e.id, e.kind, d.gpu || e.device, d.transport || d.sync_route, e.version, e.state, e.syncs], { "data-engine": e.id }); }));
    } catch (err) { console.warn("engines refresh failed", err); }
  }
  const badge = document.getElementById("live");
  const es = new EventSource("/v1/events?last_event_id=" + initial.last_event_id);
  es.onopen = () => { badge.textContent = "live"; badge.className = "badge live"; };
  es.onerror = () => { badge.textContent = "reconnecting"; badge.className = "badge down"; };
  es.addEventListener("job.state", m => {
    const j = JSON.parse(m.data).data;
    upsert("jobs", j.id, "data-job", [j.id, j.kind, j.state, j.created_at, j.finished_at, (j.error || "").slice(0, 120)], 50);
    if (["succeeded", "failed", "cancelled"].includes(j.state)) refreshEngines();
  });
  es.addEventListener("sync.finished", m => {
    const ev = JSON.parse(m.data), r = ev.data;
    addPoint({ at: ev.at, job_id: r.job_id, mode: r.mode, total_ms: r.total_ms, wire_bytes: r.wire_bytes,
      payload_bytes: r.payload_bytes, changed_fraction: r.changed_fraction, verified: r.verified });
  });
  es.addEventListener("comparison.finished", m => {
    const ev = JSON.parse(m.data), r = ev.data;
    for (const mode of ["dense", "sparse"]) if (r[mode]) addPoint({ at: ev.at, job_id: r.job_id, mode, ...r[mode], changed_fraction: null });
    const bad = Object.entries(r.verdicts || {}).filter(([, ok]) => !ok).map(([k]) => k);
    upsert("comparisons", r.job_id, "data-job", [ev.at, r.job_id, r.engine_kind, r.ok ? "PASS" : "FAIL " + bad.join(", ")], 10);
  });
  es.addEventListener("engine.state", refreshEngines);
  es.addEventListener("stream.gap", () => location.reload());
  window.wsyncDashboard = { points };
})();
