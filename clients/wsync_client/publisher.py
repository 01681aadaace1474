"""`Publisher`: publish weights from YOUR training process to engines a wsync service manages.

    from wsync_client import Client
    from wsync_client.publisher import Publisher

    with Client() as c, Publisher(c, model, name="policy") as pub:
        for step in range(steps):
            ...                                        # your loss, backward, optimizer.step()
            result = pub.publish("auto", version=step)  # dense / sparse / auto, verified by the service

The service coordinates (engines pause, join the group, post receives, resume; versions; fingerprint
verification; the result record); the bytes go from this process straight to the engines over a wsync
group where this process is rank 0 (it hosts the rendezvous store on ``host``:free port).

HTTP protocol (the routes are the service's side; see docs/PUBLISHER.md):
  POST   /v1/trainers                             {name, host, device, gpu_uuid, params} -> {id, ...}
                                                  409 when a live publisher holds the slot ``name``
  POST   /v1/trainers/{id}/publish                {mode, requested, engine_ids, version, base_version,
                                                  rendezvous, sparse_metas, bucket_bytes, fallback}
                                                  -> 202 {id, plan: {engine_id: "dense"|"sparse"}}
  POST   /v1/trainers/{id}/publish/{job_id}/done  {stats, fingerprints} or {error}
  POST   /v1/trainers/{id}/heartbeat              keeps the slot's lease alive between publishes
  DELETE /v1/trainers/{id}
Torch and the wsync service package are imported here (the publish core is torch code).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from wsync.publish import Plan, PublishReport, is_publishing_rank
from wsync.publish import Publisher as PublishCore
from wsync.publish.names import NameHook
from wsync.transfer.group import Rendezvous, backend_for, free_port, open_group
from wsync.transfer.sparse import SparsePatch

from ._core import APICall

__all__ = ["PublishFailed", "PublishResult", "Publisher", "default_host"]


class PublishFailed(RuntimeError):
    """The service failed the publish job before this process could send."""


def default_host() -> str:
    """This machine's address as the engines should dial it (the outbound interface; 127.0.0.1 offline)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _gpu_uuid(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    try:
        return str(torch.cuda.get_device_properties(device).uuid)
    except Exception:  # noqa: BLE001 - informational only
        return None


@dataclass
class PublishResult:
    """The publisher's own report and the service's job (verified or failed, with its cause)."""

    report: PublishReport
    job: Any

    @property
    def verified(self) -> bool:
        result = getattr(self.job, "result", None) or {}
        return bool(result.get("verified")) if isinstance(result, dict) else bool(getattr(result, "verified", False))


class Publisher:
    """Registers ``model`` as a trainer with the service and publishes it to engines (blocking `Client`).

    Under torchrun: construct it on every rank of an FSDP2 model (all ranks gather; only rank 0 talks to
    the service and sends); with DDP (replicated weights) construct it on rank 0 only."""

    def __init__(self, client: Any, model: torch.nn.Module, *, name: str = "default", name_map: NameHook | None = None,
                 host: str | None = None, bucket_bytes: int = 64 << 20, baseline_device: str | None = None,
                 timeout_s: float = 300.0) -> None:
        self.client = client
        self.name = name
        self.core = PublishCore(model, name_map=name_map, bucket_bytes=bucket_bytes, baseline_device=baseline_device)
        self.device = self.core.source.device
        self.host = host or default_host()
        self.timeout_s = timeout_s
        self.id: str | None = None
        self.lease_s: float | None = None
        self.rank0 = is_publishing_rank()
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- HTTP -----------------------------------------------------------------------------------
    def _http(self, method: str, path: str, body: Any = None) -> Any:
        return self.client._call(APICall(method, path, body=body))

    def register(self) -> dict:
        """POST /v1/trainers; the service checks the tensors against its engines' model (4xx naming the
        tensor on a mismatch) and refuses a slot a live publisher holds (409)."""
        body = {"name": self.name, "host": self.host, "device": str(self.device), "gpu_uuid": _gpu_uuid(self.device),
                "params": [m.to_dict() for m in self.core.metas()]}
        out = self._http("POST", "/v1/trainers", body)
        self.id, self.lease_s = out["id"], out.get("lease_s")
        if self.lease_s and self._beat is None:
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeats, name="wsync-publisher-heartbeat", daemon=True)
            self._beat.start()
        return out

    def _heartbeats(self) -> None:
        """Keep the slot's lease while this process lives (also during a long send); a process that dies
        stops beating, and the service fails its running publish once the lease runs out."""
        while not self._stop.wait(max(0.1, (self.lease_s or 30.0) / 3)):
            if self.id is None:
                continue
            with contextlib.suppress(Exception):  # the next publish reports a lost slot
                self._http("POST", f"/v1/trainers/{self.id}/heartbeat")

    def engine_versions(self, engine_ids: Sequence[str] | None) -> dict[str, str | None]:
        page = self._http("GET", "/v1/engines")
        items = page.get("items", page) if isinstance(page, dict) else page
        return {e["id"]: e.get("version") for e in items if engine_ids is None or e["id"] in engine_ids}

    # ---- publishing -----------------------------------------------------------------------------
    def publish(self, mode: str = "auto", *, engine_ids: Sequence[str] | None = None, version: int | str | None = None,
                patches: Sequence[SparsePatch] | None = None, base_version: str | None = None) -> PublishResult | None:
        """One publish to ``engine_ids`` (default: every engine). ``auto`` diffs against the version the
        engines serve (dense, saying so, when they differ or the baseline is gone). Returns None on the
        ranks of a sharded model other than 0 (they only gather)."""
        if not self.rank0:
            self.core.send(None, self.core.prepare(mode, version=version, patches=patches, base_version=base_version))
            return None
        if self.id is None:
            self.register()
        versions = self.engine_versions(engine_ids)
        held = set(versions.values())
        engine_version = held.pop() if len(held) == 1 else None
        plan = self.core.prepare(mode, version=version, engine_version=engine_version, patches=patches,
                                 base_version=base_version)
        if mode == "auto" and len(set(versions.values())) > 1:
            plan.fallback = f"engines serve different versions {sorted(map(str, set(versions.values())))}"
        rdv = Rendezvous(self.host, free_port(), len(versions) + 1, backend_for(self.device),
                         f"pub-{self.id}-{plan.version}")
        job = self._http("POST", f"/v1/trainers/{self.id}/publish", self._body(plan, list(versions), rdv))
        if job.get("mode", plan.mode) != plan.mode:  # the service found an engine without the baseline
            plan = self.core.prepare("dense", version=plan.version)
            plan.requested, plan.fallback = mode, job.get("fallback")
        return PublishResult(self._send(plan, rdv, job["id"]), self.client.wait(job["id"], timeout=self.timeout_s))

    def _body(self, plan: Plan, engine_ids: list[str], rdv: Rendezvous) -> dict:
        d = plan.to_dict()
        d.pop("dense_metas")  # the service holds them from register()
        return {**d, "engine_ids": engine_ids, "rendezvous": rdv.to_dict()}

    def _send(self, plan: Plan, rdv: Rendezvous, job_id: str) -> PublishReport:
        """Open rank 0 (until the engines join, or the job fails first), send, and tell the service how it
        went (``done`` with the report, or ``{error}``)."""
        done = f"/v1/trainers/{self.id}/publish/{job_id}/done"
        t0 = time.perf_counter()
        try:
            group = self._open(rdv, job_id)
            try:
                report = self.core.send(group, plan)
            finally:
                group.close()
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the job may have ended already; the original error matters
                self._http("POST", done, {"error": f"{type(exc).__name__}: {exc}"})
            raise
        body = report.to_dict()
        body["total_ms"] = (time.perf_counter() - t0) * 1e3
        self._http("POST", done, body)
        return report

    def _open(self, rdv: Rendezvous, job_id: str) -> Any:
        """Rank 0 of the publish's group, opened in a helper thread while the job is watched: a job that
        fails before every engine joined (an engine died, the fleet moved) ends the wait at once."""
        box: dict[str, Any] = {}

        def opener() -> None:
            try:
                box["group"] = open_group(rdv, 0, self.device, timeout_s=self.timeout_s)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                box["error"] = exc

        thread = threading.Thread(target=opener, name="wsync-publisher-open", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            if thread.is_alive():
                job = self._http("GET", f"/v1/jobs/{job_id}")
                if job.get("state") in ("failed", "cancelled"):
                    raise PublishFailed(f"publish job {job_id} {job['state']} before the engines joined: "
                                        f"{job.get('error')}")
        if "error" in box:
            raise box["error"]
        return box["group"]

    def close(self) -> None:
        """DELETE /v1/trainers/{id}: frees the slot."""
        self._stop.set()
        self._beat = None
        if self.id is not None and self.rank0:
            self._http("DELETE", f"/v1/trainers/{self.id}")
            self.id = None

    def __enter__(self) -> Publisher:
        if self.rank0:
            self.register()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
