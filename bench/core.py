"""Core phase: raw broadcast floor, wsync dense and sparse into the reference engine (a transformers
Qwen2 model's parameters). Sender (rank 0) sections and receiver (rank 1) handlers side by side.

Every timed sync: both sides meet at a barrier, the sender's clock runs from there until a second
barrier that the receiver enters only after it applied the update and synchronized its device.
After every sync the receiver's fingerprints must equal the sender's (CheckError otherwise)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from wsync.engines.hf import named_params
from wsync.transfer.delta import Snapshot
from wsync.transfer.dense import DenseReceiver, send_dense
from wsync.transfer.encodings import SparseMeta
from wsync.transfer.flat import flatten_params
from wsync.transfer.group import Rendezvous, SyncGroup, backend_for, free_port, open_group
from wsync.transfer.meta import TensorMeta
from wsync.transfer.sparse import apply_patches, post_sparse
from wsync.transfer.validate import check_metas

from .proto import (
    CheckError,
    Clock,
    Peer,
    PeerError,
    build_sparse,
    check_equal,
    encoding_counts,
    fingerprints,
    mutate,
    send_sparse_wire,
    summarize,
)
from .shapes import build_reference_lm, get_shape, hf_metas, make_weights, total_bytes

DENSE_MUTATION = 1e-4  # before every dense sync, so each one moves real changes


class Ctx:
    """Per-process state of one role (sender or receiver)."""

    def __init__(self, cfg: dict, peer: Peer, device: torch.device) -> None:
        self.cfg, self.peer, self.device = cfg, peer, device
        self.group: SyncGroup | None = None  # control (barriers) and, in the core phase, data
        self.data: SyncGroup | None = None
        self.weights: dict[str, torch.Tensor] = {}
        self.metas: list[TensorMeta] = []
        self.specs: dict[str, TensorMeta] = {}
        self.snap = Snapshot()
        self.gen: torch.Generator | None = None
        self.verified = 0
        self.in_step = False
        self.extra: dict[str, Any] = {}

    @property
    def n(self) -> int:
        return 1 + self.cfg["warmup"] + self.cfg["iters"]

    def start(self, cmd: str, **kwargs: Any) -> Any:
        """Sender: command the receiver and wait for its ready; from here until finish() a failure
        leaves the pair mid-sync (unclean: the driver then restarts both processes)."""
        info = self.peer.start(cmd, **kwargs)  # an error before ready leaves the pair clean
        self.in_step = True
        return info

    def finish(self) -> Any:
        out = self.peer.finish()
        self.in_step = False
        return out

    def ready(self, info: Any = None) -> None:
        self.peer.send("ready", info)

    def rdv(self, tag: str, backend: str | None = None) -> Rendezvous:
        backend = backend or backend_for(self.device)
        return Rendezvous("127.0.0.1", free_port(), 2, backend, f"bench-{tag}-{os.getpid()}")


def summary(ctx: Ctx, samples: list[dict]) -> dict:
    out = summarize(samples, ctx.cfg["warmup"])
    out["verified_syncs"] = len(samples)
    return out


# ---- sender sections ----------------------------------------------------------------------------
def init_sender(ctx: Ctx, weights_seed: int, mutate_seed: int):
    """The phase's shape: its metas, random weights laid out flat in the dense buckets (as the service's
    trainer lays them out) and the generator of the mutations between syncs. Returns the shape."""
    shape = get_shape(ctx.cfg["shape"])
    ctx.metas = hf_metas(shape)
    ctx.specs = {m.name: m for m in ctx.metas}
    ctx.weights = make_weights(ctx.metas, ctx.device, seed=weights_seed)
    flatten_params(ctx.weights, ctx.cfg["bucket_bytes"])
    ctx.gen = torch.Generator(device=ctx.device).manual_seed(mutate_seed)
    return shape


def setup_core(ctx: Ctx) -> dict:
    init_sender(ctx, weights_seed=1, mutate_seed=7)
    rdv = ctx.rdv("core")
    info = ctx.start("setup_core", rdv=rdv.to_dict(), metas=[m.to_dict() for m in ctx.metas])
    ctx.group = ctx.data = open_group(rdv, 0, ctx.device, ctx.cfg["group_timeout_s"])
    ctx.group.barrier()
    ctx.finish()
    return {"tensors": len(ctx.metas), "bytes": total_bytes(ctx.metas), "receiver": info,
            "device": device_info(ctx.device)}


def device_info(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core CPU"


def nccl_floor(ctx: Ctx) -> dict:
    """One flat buffer of the model's total bytes, one broadcast (the link floor)."""
    nbytes = total_bytes(ctx.metas)
    buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=ctx.device)
    ctx.start("floor", nbytes=nbytes, n=ctx.n)
    samples = []
    for _ in range(ctx.n):
        ctx.group.barrier()
        clock = Clock(ctx.device).start()
        ctx.group.broadcast(buf)
        samples.append({"ms": clock.stop()})
    ctx.finish()
    out = summarize(samples, ctx.cfg["warmup"])
    out["gbps"] = nbytes / out["ms"] / 1e6
    out["bytes"] = nbytes
    return out


def dense_variant(ctx: Ctx, what: str, rx_cmd: str, send: Callable[[], dict], expected: Callable[[], dict],
                  snap_key: str) -> dict:
    """`n` dense syncs: mutate a little, barrier, send || receive+apply, barrier, check."""
    samples = []
    for i in range(ctx.n):
        mutate(ctx.weights, DENSE_MUTATION, ctx.gen)
        ctx.start(rx_cmd)
        ctx.group.barrier()
        clock = Clock(ctx.device).start()
        sent = send()
        ctx.group.barrier()
        row = {"ms": clock.stop(), **sent}
        want = expected()
        got = ctx.finish()
        check_equal(f"{what} sync {i}", want, got.pop("fp"))
        ctx.verified += 1
        samples.append({**row, **{k: v for k, v in got.items() if isinstance(v, (int, float))}})
    ctx.snap.refresh(snap_key, ctx.weights)
    return summary(ctx, samples)


def ref_dense(ctx: Ctx) -> dict:
    items, bucket = list(ctx.weights.items()), ctx.cfg["bucket_bytes"]

    def send() -> dict:
        st = send_dense(ctx.data, items, bucket)
        return {"send_ms": st.ms, "wire_bytes": st.wire_bytes, "messages": st.messages}

    out = dense_variant(ctx, "wsync dense -> reference", "dense_ref", send, lambda: fingerprints(ctx.weights), "ref")
    out["bucket_bytes"] = bucket
    return out


def sparse_step(ctx: Ctx, key: str, density: float, encoding: str, rx_cmd: str,
                expected: Callable[[], dict]) -> dict:
    """One real-delta sparse sync: mutate, diff against the snapshot of `key`, then (timed) build,
    metas out of band, broadcasts, receiver decode + apply; check; scatter into the snapshot."""
    changed = mutate(ctx.weights, density, ctx.gen)
    clock = Clock(ctx.device).start()
    patches = ctx.snap.diff(key, ctx.weights)
    diff_ms = clock.stop()
    ctx.start(rx_cmd)
    ctx.group.barrier()
    e2e = Clock(ctx.device).start()
    try:
        metas, stream = build_sparse(patches, ctx.specs, encoding, ctx.weights, ctx.device)
    except Exception as exc:
        release(ctx, exc)
        raise
    build_ms = e2e.lap()
    ctx.peer.send("data", [m.to_dict() for m in metas])
    ctx.peer.recv("data")  # the receiver holds the metas and is about to post its receives
    clock = Clock(ctx.device).start()
    wire, messages = send_sparse_wire(ctx.data, metas, patches, stream)
    send_ms = clock.stop()
    ctx.group.barrier()
    ms = e2e.stop()
    got = ctx.finish()
    check_equal(f"wsync sparse {encoding} d={density} -> {key}", expected(), got.pop("fp"))
    ctx.verified += 1
    clock = Clock(ctx.device).start()
    ctx.snap.update(key, patches)
    count = sum(p.count for p in patches)
    ctx.extra["encodings"] = encoding_counts(metas)
    nbytes = total_bytes(ctx.metas)
    return {"ms": ms, "send_ms": send_ms, "build_ms": build_ms, "diff_ms": diff_ms,
            "diff_gbps": 2 * nbytes / diff_ms / 1e6 if diff_ms else 0.0, "snapshot_update_ms": clock.stop(),
            "changed": count, "mutated": changed, "wire_bytes": wire, "messages": messages,
            "wire_bytes_per_changed_elem": wire / count if count else 0.0,
            **{k: v for k, v in got.items() if isinstance(v, (int, float))}}


def release(ctx: Ctx, exc: BaseException) -> None:
    """The sender failed after the barrier but before any broadcast, while the receiver waits for the
    metas: hand it the error instead, take its answer, and both sides are clean again."""
    ctx.peer.error(exc)
    try:
        ctx.peer.recv("done")
    except PeerError:
        pass
    ctx.in_step = False


def sparse_variant(ctx: Ctx, key: str, density: float, encoding: str, rx_cmd: str,
                   expected: Callable[[], dict]) -> dict:
    samples = [sparse_step(ctx, key, density, encoding, rx_cmd, expected) for _ in range(ctx.n)]
    out = summary(ctx, samples)
    out["encodings"] = ctx.extra.pop("encodings", {})
    out["density"], out["encoding"] = density, encoding
    return out


def ref_sparse(ctx: Ctx) -> dict:
    out: dict[str, Any] = {}
    for d in ctx.cfg["densities"]:
        out[str(d)] = {}
        for enc in ctx.cfg["encodings"]:
            try:
                out[str(d)][enc] = sparse_variant(ctx, "ref", d, enc, "sparse_ref", lambda: fingerprints(ctx.weights))
            except CheckError:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on while the pair is in step
                out[str(d)][enc] = {"error": f"{type(exc).__name__}: {exc}"}
                if ctx.in_step:
                    raise
    return out


SENDER_SECTIONS = {"setup_core": setup_core, "nccl_floor": nccl_floor, "ref_dense": ref_dense,
                   "ref_sparse": ref_sparse}


# ---- receiver handlers --------------------------------------------------------------------------
def rx_setup_core(rx: Ctx, rdv: dict, metas: list[dict]) -> dict:
    lm = build_reference_lm(get_shape(rx.cfg["shape"]), rx.device)
    rx.extra["lm"] = lm
    rx.weights = named_params(lm)
    flatten_params(rx.weights, rx.cfg["bucket_bytes"])  # as the service's reference engine lays them out
    rx.metas = [TensorMeta.from_dict(m) for m in metas]
    check_metas(rx.metas, rx.weights)
    rx.ready({"params": len(rx.weights)})
    rx.group = rx.data = open_group(Rendezvous.from_dict(rdv), 1, rx.device, rx.cfg["group_timeout_s"])
    rx.group.barrier()
    return {"params": len(rx.weights)}


def rx_floor(rx: Ctx, nbytes: int, n: int) -> dict:
    buf = torch.empty(nbytes, dtype=torch.uint8, device=rx.device)
    rx.ready()
    for _ in range(n):
        rx.group.barrier()
        rx.group.broadcast(buf)
    return {}


def rx_dense_ref(rx: Ctx) -> dict:
    rx.ready()
    rx.group.barrier()
    if "dense_rx" not in rx.extra:  # built once, as the reference engine keeps it
        rx.extra["dense_rx"] = DenseReceiver(rx.metas, rx.cfg["bucket_bytes"], rx.weights, rx.device)
    st = rx.extra["dense_rx"].recv(rx.data)
    rx.group.barrier()
    return {"recv_ms": st.ms, "fp": fingerprints(rx.weights)}


def rx_sparse_ref(rx: Ctx) -> dict:
    """Metas in, receives posted, then "got" (so the sender's send time is the wire's), decode, apply."""
    rx.ready()
    rx.group.barrier()
    metas = [SparseMeta.from_dict(d) for d in rx.peer.recv("data")]
    clock = Clock(rx.device).start()
    pending = post_sparse(rx.data, metas, rx.device)
    rx.peer.send("data", "got")
    patches, st = pending.wait()
    apply_patches(rx.weights, patches)
    recv_ms = clock.stop()
    rx.group.barrier()
    return {"recv_ms": recv_ms, "fp": fingerprints(rx.weights)}


RECEIVER_HANDLERS = {"setup_core": rx_setup_core, "floor": rx_floor, "dense_ref": rx_dense_ref,
                     "sparse_ref": rx_sparse_ref}
