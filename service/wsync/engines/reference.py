"""The reference engine: a transformers model that serves greedy generation and receives dense and
sparse updates over torch.distributed (gloo on CPU, NCCL on GPU), applying them in place.

It implements the one engine contract (engines/contract.py: EngineCore) and receives on the wsync wire
("gloo" on CPU, "nccl" on GPU) and, on a GPU, over "cuda_ipc" from a trainer on the same physical GPU
(engines/ipc_recv.py: the trainer's flat buckets mapped once, device copies per sync)."""

from __future__ import annotations

import time

import torch

from wsync.transfer.dense import DenseReceiver
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.flat import flatten_params
from wsync.transfer.group import Rendezvous, SyncGroup, backend_for, open_group
from wsync.transfer.meta import TensorMeta, param_metas
from wsync.transfer.sparse import SparseMeta, apply_patches, recv_sparse

from .contract import DenseUpdate, EngineDetails, ReceiveReport, SparseUpdate
from .hf import (
    greedy_generate,
    load_causal_lm,
    named_params,
    resolve_device,
    set_cpu_threads,
)
from .sampling import sample

CUDA_IPC = "cuda_ipc"


class EngineError(RuntimeError):
    pass


class ReferenceEngineCore:
    kind = "reference"

    def __init__(self, model: str, device: str | None = None, options: dict | None = None):
        options = options or {}
        self.device = resolve_device(device)
        set_cpu_threads(self.device)
        self.model_name = model
        self.lm, self.tokenizer = load_causal_lm(model, options.get("dtype", "bfloat16"), self.device)
        self.params = named_params(self.lm)
        if options.get("bucket_bytes"):  # lay parameters out as the dense wire's buckets: zero-copy receive
            flatten_params(self.params, int(options["bucket_bytes"]))
        self.group: SyncGroup | None = None
        self.ipc = None  # engines/ipc_recv.IpcReceiver while in a cuda_ipc session
        self._generation = 0  # bumped by leave_group: a join that was abandoned meanwhile closes itself
        self.paused = False

    # ---- serving ------------------------------------------------------------------------
    def ready(self) -> EngineDetails:
        return EngineDetails(kind=self.kind, model=self.model_name, device=str(self.device),
                             num_tensors=len(self.params), transports=self._transports(),
                             gpu_uuid=_gpu_uuid(self.device))

    def generate(self, prompts: list[str], max_new_tokens: int = 1) -> list[dict]:
        if self.paused:
            raise EngineError("engine is paused for a weight update")
        return greedy_generate(self.lm, self.tokenizer, prompts, max_new_tokens, self.device)

    def sample(self, prompts: list[str], n: int = 1, max_new_tokens: int = 16, temperature: float = 1.0,
               top_k: int = 0, seed: int = 0) -> list[dict]:
        """Rollouts (engines.contract.SamplingEngine) via engines.sampling.sample: logprobs from one full
        forward over each prompt's [n, L] batch, so a trainer with equal weights gets equal numbers."""
        if self.paused:
            raise EngineError("engine is paused for a weight update")
        return sample(self.lm, self.tokenizer, prompts, n, max_new_tokens, temperature=temperature, top_k=top_k,
                      seed=seed, device=self.device)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    # ---- weights ------------------------------------------------------------------------
    def param_metas(self) -> list[TensorMeta]:
        return param_metas(self.params.items())

    def fingerprint(self, names: list[str] | None = None) -> dict[str, str]:
        items = self.params.items() if names is None else [(n, self.params[n]) for n in names]
        return fingerprint(items)

    def join_group(self, rendezvous: dict, rank: int, transport: str, timeout_s: float = 300.0) -> None:
        """Join the trainer's group at ``rank`` (blocks until every rank joined). ``transport`` is one of
        ``ready().transports``; the rendezvous names the backend."""
        if transport not in self._transports():
            raise EngineError(f"this reference engine receives on {self._transports()}, not {transport!r}")
        self.leave_group()
        if transport == CUDA_IPC:
            from .ipc_recv import IpcReceiver

            receiver = IpcReceiver(self.device)
            try:
                receiver.join(rendezvous, int(rank))
            except BaseException:
                receiver.close()
                raise
            self.ipc = receiver
            return
        generation = self._generation
        group = open_group(Rendezvous(**rendezvous), rank, self.device, timeout_s=timeout_s)
        if generation != self._generation:  # left (on the control lane) while this join waited
            group.close(abort=True)
            raise EngineError(f"transfer group {rendezvous.get('name')} was abandoned while it opened")
        self.group = group

    def leave_group(self) -> None:
        """Leave the group now (may run on the control lane while a receive on it is stuck: abort)."""
        self._generation += 1
        group, self.group = self.group, None
        if group is not None:
            group.close(abort=True)
        if self.ipc is not None:
            receiver, self.ipc = self.ipc, None
            receiver.close()

    def prepare_sync(self, update: DenseUpdate) -> None:
        """Check the layout and build the dense receiver before any byte moves."""
        self._check_metas(update.metas)
        if self.ipc is None:
            self._dense_receiver(update.metas, update.bucket_bytes)

    def recv_dense(self, update: DenseUpdate) -> ReceiveReport:
        if self.ipc is not None or update.ipc is not None:
            return self._recv_dense_ipc(update)
        group = self._require_group()
        self._check_metas(update.metas)
        t0 = time.perf_counter()
        with torch.no_grad():
            stats = self._dense_receiver(update.metas, int(update.bucket_bytes)).recv(group)
        return ReceiveReport(recv_ms=(time.perf_counter() - t0) * 1e3, bytes=stats.bytes, zero_copy=stats.zero_copy,
                             messages=stats.messages)

    def _dense_receiver(self, metas: list[TensorMeta], bucket_bytes: int) -> DenseReceiver:
        """One DenseReceiver per (layout, bucket size), kept between syncs: its validation, plan and views
        are built before the first sync, not while the trainer waits for this engine to post."""
        key = (tuple((m.name, m.dtype, tuple(m.shape)) for m in metas), bucket_bytes)
        cached = getattr(self, "_dense_rx", None)
        if cached is None or cached[0] != key:
            cached = self._dense_rx = (key, DenseReceiver(metas, bucket_bytes, self.params, self.device))
        return cached[1]

    def _recv_dense_ipc(self, update: DenseUpdate) -> ReceiveReport:
        receiver = self._require_ipc(update.ipc)
        self._check_metas(update.metas)
        t0 = time.perf_counter()
        nbytes, copies = receiver.dense(update.ipc, self.params)  # type: ignore[arg-type]
        return ReceiveReport(recv_ms=(time.perf_counter() - t0) * 1e3, bytes=nbytes, messages=copies,
                             extra={"transport": CUDA_IPC})

    def _recv_sparse_ipc(self, update: SparseUpdate) -> ReceiveReport:
        receiver = self._require_ipc(update.ipc)
        metas: list[SparseMeta] = list(update.metas)
        self._check_metas(metas)
        t0 = time.perf_counter()
        elements = receiver.sparse(update.ipc, metas, self.params)  # type: ignore[arg-type]
        return ReceiveReport(recv_ms=(time.perf_counter() - t0) * 1e3, elements=elements,
                             extra={"transport": CUDA_IPC})

    def _require_ipc(self, ipc):
        if self.ipc is None:
            raise EngineError("engine is not in a cuda_ipc session (join_group first)")
        if ipc is None:
            raise EngineError("a cuda_ipc session needs the update's ipc field (export id / staging id)")
        return self.ipc

    def _transports(self) -> list[str]:
        """The wsync wire for this device, and CUDA IPC first on a GPU (usable only from a trainer on
        the same physical GPU: the service compares UUIDs)."""
        return ([CUDA_IPC] if self.device.type == "cuda" else []) + [backend_for(self.device)]

    def recv_sparse(self, update: SparseUpdate) -> ReceiveReport:
        if self.ipc is not None or update.ipc is not None:
            return self._recv_sparse_ipc(update)
        group = self._require_group()
        metas: list[SparseMeta] = list(update.metas)
        self._check_metas(metas)
        t0 = time.perf_counter()
        with torch.no_grad():
            patches = recv_sparse(group, metas, self.device)
            apply_patches(self.params, patches)  # a few scatters: the params are laid out flat
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return ReceiveReport(recv_ms=(time.perf_counter() - t0) * 1e3, elements=sum(m.count for m in metas))

    def apply_flat(self, staged) -> dict:
        """A flat-format sparse sync (transfer/ipc_flat.py, e.g. read from a CUDA-IPC staging buffer) into
        the parameters: one range check (one host sync; nothing written on a bad index), one scatter per
        dtype run of each flat bucket (flatten_params). The storage plan is rebuilt when a parameter moved."""
        from wsync.transfer.ipc_flat import apply_flat, flat_ranges

        key = tuple(p.data_ptr() for p in self.params.values())
        cached = getattr(self, "_flat_ranges", None)
        if cached is None or cached[0] != key:
            cached = self._flat_ranges = (key, flat_ranges(self.params))
        with torch.no_grad():
            out = apply_flat(cached[1], staged)
        if self.params and next(iter(self.params.values())).device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def shutdown(self) -> None:
        self.leave_group()

    # ---- helpers ------------------------------------------------------------------------
    def _require_group(self) -> SyncGroup:
        if self.group is None:
            raise EngineError("engine has not joined a transfer group")
        return self.group

    def _check_metas(self, metas) -> None:
        """Refuse an update whose metadata does not match this engine before any byte is received."""
        for m in metas:
            p = self.params.get(m.name)
            if p is None:
                raise EngineError(f"{m.name}: no such parameter in this engine")
            if list(p.shape) != list(m.shape) or str(p.dtype).removeprefix("torch.") != m.dtype:
                raise EngineError(f"{m.name}: engine has {str(p.dtype).removeprefix('torch.')}{list(p.shape)}, "
                                  f"update says {m.dtype}{list(m.shape)}")


def _gpu_uuid(device: torch.device) -> str | None:
    """The physical GPU's UUID ("GPU-…") where the weights live; None on CPU or when unknown."""
    if device.type != "cuda":
        return None
    try:
        return "GPU-" + str(torch.cuda.get_device_properties(device).uuid)
    except Exception:  # noqa: BLE001 - older torch: no uuid
        return None
