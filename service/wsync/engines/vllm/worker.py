"""The worker extension: vLLM mixes WsyncWorkerExtension into its Worker through
`LLM(worker_extension_cls=EXTENSION_QUALNAME)`, and the engine core calls its methods by name through
`collective_rpc`; the method names are therefore a wire and stay stable (prefixed `wsync_` so they
never clash with the Worker's own).

The extension is a stack of mixins, one per receive path; a new path (e.g. CUDA IPC) is one more base
class here:
- NativeWireMixin (below): vLLM's wire over the native engine's communicator (or `_wsync_comm`),
  dense through model.load_weights (checkpoint/HF names), sparse received whole, checked, then
  index_copy_ into the runtime parameter (runtime names, TP=1); a bad patch leaves the model untouched.
  Serves dense into a 'sparse_nccl' engine (Gen B-D), where vLLM's engine takes no dense round.
- DirectReceiveMixin (direct.py): wsync's own wire straight into the runtime parameters.
- IpcReceiveMixin (ipc.py): CUDA IPC from a trainer on the same GPU, through the direct map."""

from __future__ import annotations

import time
from typing import Any

import torch

from wsync.transfer.meta import dtype_name

from .comm import communicator_of, current_stream, device_sync
from .direct import DirectReceiveMixin
from .ipc import IpcReceiveMixin


class NativeWireMixin:
    """vLLM's unpacked wire received by wsync's code, plus the read-only views the engine core needs."""

    def wsync_close_group(self) -> None:
        self._wsync_comm = None
        getattr(getattr(self, "weight_transfer_engine", None), "shutdown", lambda: None)()

    def _wsync_comm_or_native(self):
        comm = getattr(self, "_wsync_comm", None) or communicator_of(getattr(self, "weight_transfer_engine", None))
        if comm is None:
            raise RuntimeError("wsync: no transfer group on this worker (join_group first)")
        return comm

    def wsync_recv_dense(self, names: list, dtype_names: list, shapes: list, **_: Any) -> float:
        comm, model, stream = self._wsync_comm_or_native(), self.model_runner.model, current_stream()
        t0 = time.perf_counter()
        with torch.no_grad():
            for name, dt, shape in zip(names, dtype_names, shapes):
                w = torch.empty(shape, dtype=getattr(torch, dt), device=self.device)
                comm.broadcast(w, src=0, stream=stream)
                model.load_weights(weights=[(name, w)])
        device_sync()
        return (time.perf_counter() - t0) * 1e3

    def wsync_recv_sparse(self, names: list, dtype_names: list, num_updates_list: list, **_: Any) -> float:
        comm, model, stream = self._wsync_comm_or_native(), self.model_runner.model, current_stream()
        t0 = time.perf_counter()
        got = []
        for dt, n in zip(dtype_names, num_updates_list):
            idx = torch.empty(int(n), dtype=torch.int32, device=self.device)
            val = torch.empty(int(n), dtype=getattr(torch, dt), device=self.device)
            comm.broadcast(idx, src=0, stream=stream)
            comm.broadcast(val, src=0, stream=stream)
            got.append((idx, val))
        params = dict(model.named_parameters())
        for name, (idx, val) in zip(names, got):
            p = params.get(name)
            if p is None or not p.data.is_contiguous() or p.dtype != val.dtype:
                raise ValueError(f"wsync: {name}: no contiguous {val.dtype} runtime parameter by that name "
                                 "(sparse patches use runtime names, e.g. fused qkv_proj / gate_up_proj)")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
                raise ValueError(f"wsync: {name}: sparse index out of range for {p.numel()} elements")
        with torch.no_grad():
            for name, (idx, val) in zip(names, got):
                params[name].data.view(-1).index_copy_(0, idx.long(), val)
        device_sync()
        return (time.perf_counter() - t0) * 1e3

    def wsync_param_metas(self) -> list[dict]:
        return [{"name": n, "dtype": dtype_name(p.dtype), "shape": list(p.shape)}
                for n, p in self.model_runner.model.named_parameters()]

    def wsync_fingerprint(self, names: list | None = None) -> dict:
        from wsync.transfer.fingerprint import fingerprint

        params = dict(self.model_runner.model.named_parameters())
        with torch.no_grad():
            return fingerprint([(n, params[n].data) for n in (params if names is None else names) if n in params])



class WsyncWorkerExtension(IpcReceiveMixin, DirectReceiveMixin, NativeWireMixin):
    """What vLLM loads as worker_extension_cls (see the module docstring)."""
