"""Bench plumbing shared by both roles: the sender<->receiver control pipe, clocks, sample summaries,
fingerprint checks, weight mutation, and wsync's sparse wire split into build (plan + encode + pack)
and send (the broadcasts alone)."""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from wsync.transfer.encodings import FLAT, SparseMeta, SparsePatch
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.group import SyncGroup
from wsync.transfer.sparse import pack_stream, plan_sparse


class CheckError(RuntimeError):
    """Receiver weights differ from the sender's after a sync: the run must fail."""


class PeerError(RuntimeError):
    """The other side of the control pipe reported an error (its traceback is the message)."""


class Peer:
    """One end of the sender<->receiver pipe. Messages: ("cmd", name, kwargs) from the sender;
    ("ready", info) / ("done", result) / ("error", text) / ("data", obj) either way."""

    def __init__(self, conn, timeout_s: float = 600.0) -> None:
        self.conn = conn
        self.timeout_s = timeout_s

    def send(self, *msg: Any) -> None:
        self.conn.send(msg)

    def recv(self, want: str | None = None) -> Any:
        while True:
            if not self.conn.poll(self.timeout_s):
                raise TimeoutError(f"no message from the other side in {self.timeout_s:.0f} s")
            msg = self.conn.recv()
            if msg[0] == "error":
                raise PeerError(msg[1])
            if want is None or msg[0] == want:
                return msg[1] if len(msg) > 1 else None

    def start(self, cmd: str, **kwargs: Any) -> Any:
        """Send a command and wait until the receiver is ready (checks done, about to enter collectives)."""
        self.send("cmd", cmd, kwargs)
        return self.recv("ready")

    def finish(self) -> Any:
        return self.recv("done")

    def call(self, cmd: str, **kwargs: Any) -> Any:
        self.send("cmd", cmd, kwargs)
        return self.recv("done")

    def error(self, exc: BaseException) -> None:
        self.send("error", "".join(traceback.format_exception(exc)))


# ---- clocks and summaries ----------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall time in ms between start() and stop(), device-synchronized at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t0 = 0.0

    def start(self) -> Clock:
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def lap(self) -> float:
        """ms since start(), device-synchronized; the clock keeps running."""
        sync(self.device)
        return (time.perf_counter() - self.t0) * 1e3

    stop = lap


def summarize(samples: Sequence[Mapping[str, Any]], warmup: int) -> dict[str, Any]:
    """First sample, then median/min/max of every numeric field over samples[1 + warmup:]."""
    out: dict[str, Any] = {"n": len(samples), "warmup": warmup, "first": dict(samples[0]) if samples else {}}
    steady = samples[1 + warmup:] or samples[-1:]
    out["steady_n"] = len(steady)
    for key in (steady[0] if steady else {}):
        vals = [s[key] for s in steady if isinstance(s.get(key), (int, float))]
        if vals:
            out[key] = statistics.median(vals)
            out[key + "_min"], out[key + "_max"] = min(vals), max(vals)
    out["samples"] = [dict(s) for s in samples]
    return out


# ---- checks ------------------------------------------------------------------------------------
def check_equal(what: str, sender: Mapping[str, str], receiver: Mapping[str, str]) -> None:
    """Exact fingerprint equality of every tensor, else CheckError."""
    if dict(sender) == dict(receiver):
        return
    missing = sorted(set(sender) ^ set(receiver))
    differ = [n for n in sender if n in receiver and sender[n] != receiver[n]]
    raise CheckError(f"{what}: receiver != sender: {len(differ)} tensors differ (e.g. {differ[:3]}), "
                     f"{len(missing)} names on one side only (e.g. {missing[:3]})")


def fingerprints(named: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]) -> dict[str, str]:
    return fingerprint(named)


# ---- mutation: real changes at a given density --------------------------------------------------
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def mutate(weights: Mapping[str, torch.Tensor], density: float, gen: torch.Generator) -> int:
    """Flip 1..127 in the low mantissa bits of a Bernoulli(density) subset of every tensor, in place:
    every chosen element changes and stays finite. Returns the number of changed elements."""
    changed = 0
    for t in weights.values():
        flat = t.view(-1)
        mask = torch.rand(flat.numel(), generator=gen, device=t.device) < density
        idx = mask.nonzero().view(-1)
        if idx.numel():
            ints = flat.view(_INT[t.element_size()])
            flips = torch.randint(1, 128, (idx.numel(),), generator=gen, device=t.device).to(ints.dtype)
            ints[idx] = ints[idx] ^ flips
        changed += int(idx.numel())
    return changed


# ---- wsync sparse, split into build and send (the exact wire of wsync.transfer.sparse.send_sparse) --
def build_sparse(patches: Sequence[SparsePatch], specs: Mapping, encoding: str,
                 params: Mapping[str, torch.Tensor], device: torch.device) -> tuple[list[SparseMeta], torch.Tensor]:
    """plan_sparse + encode every non-flat patch into the one packed stream (8-byte aligned sections),
    as send_sparse builds it: one batched pack_stream call (no host sync after the plan's)."""
    metas = plan_sparse(patches, specs, encoding, params)
    return metas, pack_stream(patches, metas, params, device)


def send_sparse_wire(group: SyncGroup, metas: Sequence[SparseMeta], patches: Sequence[SparsePatch],
                     stream: torch.Tensor) -> tuple[int, int]:
    """Broadcast flat_int32 patches (indices, values; metas order), then the packed stream; waits.
    Returns (wire bytes, broadcasts)."""
    by_name = {p.name: p for p in patches}
    works, wire, messages = [], 0, 0
    for meta in metas:
        if meta.encoding != FLAT or meta.count == 0:
            continue
        p = by_name[meta.name]
        works += [group.broadcast_async(p.indices, src=0), group.broadcast_async(p.values, src=0)]
        wire, messages = wire + meta.nbytes, messages + 2
    if stream.numel():
        works.append(group.broadcast_async(stream, src=0))
        wire, messages = wire + stream.numel(), messages + 1
    for w in works:
        w.wait()
    return wire, messages


def encoding_counts(metas: Sequence[SparseMeta]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in metas:
        out[m.encoding] = out.get(m.encoding, 0) + 1
    return out
