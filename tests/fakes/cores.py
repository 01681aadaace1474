"""A fake trainer and a fake engine core implementing the engine contract (engines/contract.py) and
the trainer's actor surface, in process, on a few small CPU tensors. Weights really move (through
tests.fakes.wire.Hub) and are compared by wsync's real fingerprints, so a sync either verifies or not."""

from __future__ import annotations

import threading
from typing import Any

import torch

from wsync.engines.contract import DenseUpdate, EngineDetails, IpcDense, IpcSparse, ReceiveReport, SparseUpdate
from wsync.schemas import TrainerInfo, TrainerStepResult
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.meta import TensorMeta, TransferStats, param_metas
from wsync.transfer.sparse import SparseMeta, SparsePatch, payload_bytes

from .wire import Hub, WireError


def baseline(model: str) -> dict[str, torch.Tensor]:
    """The 'checkpoint' of a fake model: three small float32 tensors, the same for every reader."""
    gen = torch.Generator().manual_seed(len(model))
    return {"model.embed_tokens.weight": torch.randn(16, 8, generator=gen),
            "layer.weight": torch.randn(8, 8, generator=gen), "norm.weight": torch.ones(8)}


def _apply(params: dict[str, torch.Tensor], patches: list[SparsePatch]) -> None:
    for p in patches:
        params[p.name].view(-1)[p.indices.long()] = p.values.to(params[p.name].dtype)


class FakeTrainer:
    """The trainer actor's surface (wsync.actors.trainer.TrainerCore) on fake weights."""

    def __init__(self, hub: Hub, device: str = "cpu"):
        self.hub, self.device = hub, device
        self.model: str | None = None
        self.params: dict[str, torch.Tensor] = {}
        self.version: str | None = None
        self.patches: dict[str, list[SparsePatch]] = {}
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}
        self.groups: set[str] = set()
        self.ipc: dict[str, dict[int, dict]] = {}  # cuda_ipc group -> rank -> what that engine was sent
        self.gate = threading.Event()  # tests hold prepare_delta here to catch a running job
        self.gate.set()

    def load(self, model: str, dtype: str = "float32") -> TrainerInfo:
        self.hub.log("trainer", "load")
        self.model, self.params, self.version = model, baseline(model), f"base:{model}"
        self.patches.clear()
        return self.info()

    def reset(self) -> TrainerInfo:
        return self.load(self.model or "fake")

    def stash(self) -> TrainerInfo:
        self._stash = (self.model, self.params, self.version, dict(self.patches), self.snapshots)
        self.patches, self.snapshots = {}, {}
        return self.load(self.model or "fake")

    def unstash(self) -> TrainerInfo:
        self.model, self.params, self.version, self.patches, self.snapshots = self._stash
        return self.info()

    def info(self) -> TrainerInfo:
        if self.model is None:
            return TrainerInfo(loaded=False)
        metas = self.param_metas()
        return TrainerInfo(loaded=True, model=self.model, dtype="float32", device=self.device, version=self.version,
                           num_tensors=len(metas), num_params=sum(m.numel for m in metas),
                           param_bytes=sum(m.nbytes for m in metas))

    def param_metas(self) -> list[TensorMeta]:
        return param_metas(self.params.items())

    def generate(self, prompts: list[str], max_new_tokens: int = 1) -> list[dict]:
        tok = int(sum(float(p.sum()) for p in self.params.values()) * 1000) % 997
        return [{"token_ids": [tok] * max_new_tokens, "text": ""} for _ in prompts]

    def fingerprint(self, names: list[str] | None = None) -> dict[str, str]:
        return fingerprint([(n, self.params[n]) for n in (names or self.params)])

    def prepare_patch(self, patch_id: str, kind: str, spec: dict) -> dict:
        self.hub.log("trainer", "prepare_patch")
        if kind == "inline":
            patches = list(spec["patches"])
        else:
            seed = int(spec.get("seed") or 0) + len(self.patches) + 1
            patches = [SparsePatch("layer.weight", torch.tensor([seed % 64, 63], dtype=torch.int32),
                                   torch.tensor([float(seed), -1.0]))]
        return self._hold(patch_id, patches, base=self.version, target=patch_id)

    def prepare_delta(self, patch_id: str, base_version: str) -> dict:
        self.gate.wait(30)
        self.hub.log("trainer", "prepare_delta")
        snap = self.snapshots[base_version]
        patches = []
        for name, p in self.params.items():
            idx = (p != snap[name]).view(-1).nonzero().view(-1).to(torch.int32)
            if idx.numel():
                patches.append(SparsePatch(name, idx, p.view(-1)[idx.long()].clone()))
        out = self._hold(patch_id, patches, base=base_version, target=self.version)
        return {**out, "target_version": self.version, "diff_ms": 0.1, "diff_gbps": 1.0}

    def _hold(self, patch_id: str, patches: list[SparsePatch], base: str | None, target: str | None) -> dict:
        _apply(self.params, patches)
        self.patches[patch_id] = patches
        self.version = target
        return {"base_version": base, "num_elements": sum(int(p.indices.numel()) for p in patches),
                "tensors": [{"name": p.name, "dtype": "float32", "shape": list(self.params[p.name].shape),
                             "count": int(p.indices.numel())} for p in patches],
                "payload_bytes": payload_bytes(patches), "digest": f"d-{patch_id}", "selected_token_ids": []}

    def step(self, step_id: str, texts: list[str], optimizer: str, lr: float, steps: int) -> TrainerStepResult:
        self.params["norm.weight"] += lr
        self.version = step_id
        return TrainerStepResult(version=step_id, losses=[1.0] * steps, step_ms=0.1)

    def mark_synced(self, version: str, patch_id: str | None, base_version: str | None, keep: list[str]) -> list[str]:
        if version == self.version:
            self.snapshots[version] = {n: p.clone() for n, p in self.params.items()}
        self.snapshots = {k: v for k, v in self.snapshots.items() if k == version or k in keep}
        return sorted(self.snapshots)

    # ---- groups and sends ---------------------------------------------------------------
    def rendezvous(self, world_size: int, name: str, backend: str | None = None, host: str | None = None) -> dict:
        return {"host": host or "local", "port": 0, "world_size": world_size, "backend": backend or "gloo",
                "name": name}

    def open_group(self, rendezvous: dict, timeout_s: float = 300.0) -> None:
        self.hub.log("trainer", "open_group", rendezvous["name"])
        self.hub.join(rendezvous["name"], 0, rendezvous["world_size"], timeout_s)
        self.groups.add(rendezvous["name"])

    def open_vllm_group(self, rendezvous: dict, timeout_s: float = 300.0) -> None:
        self.hub.log("trainer", "open_vllm_group", rendezvous["name"])
        self.hub.join(rendezvous["name"], 0, rendezvous["world_size"], timeout_s)
        self.groups.add(rendezvous["name"])

    def close_group(self, name: str | None = None, abort: bool = False) -> None:
        self.hub.log("trainer", "close_group", name)
        for key in [name] if name else list(self.groups) + list(self.ipc):
            self.groups.discard(key)
            self.hub.close(key)
            for sess in self.ipc.pop(key, {}).values():  # the trainer's exports and staging go
                self.hub.shared.pop(sess.get("staging") or "", None)

    # ---- fake cuda_ipc (the trainer's tensors are "shared": engines read them in place) ---------
    def gpu_uuid(self) -> str | None:
        return self.hub.trainer_gpu

    def gpu_memory(self) -> dict:
        return {"free": 80 << 30, "total": 100 << 30, "allocated": 1 << 30, "param_bytes": 1 << 20}

    def _export_id(self) -> str:
        eid = f"x-{id(self.params)}"  # a reload replaces the tensors: a new export
        self.hub.shared[eid] = self.params
        return eid

    def ipc_open(self, group: str, rank: int, engine_uuid: str | None) -> dict:
        self.hub.log("trainer", "ipc_open", group)
        if not self.hub.trainer_gpu or engine_uuid != self.hub.trainer_gpu:
            raise WireError(f"IpcDeviceError: engine on GPU {engine_uuid}, trainer on {self.hub.trainer_gpu}")
        eid = self._export_id()
        self.ipc.setdefault(group, {})[rank] = {"export": eid, "staging": None}
        return {"export_id": eid}

    def ipc_sessions(self, group: str, expected: int) -> list[int]:
        self.hub.log("trainer", "ipc_sessions", group)
        ranks = sorted(self.ipc.get(group, {}))
        assert ranks == list(range(1, expected + 1)), ranks
        return ranks

    def ipc_dense_ready(self, group: str) -> dict[int, IpcDense]:
        self.hub.log("trainer", "ipc_dense_ready", group)
        eid, out = self._export_id(), {}
        for rank, sess in self.ipc[group].items():
            out[rank] = IpcDense(eid, {"export_id": eid} if eid != sess["export"] else None)
            sess["export"] = eid
        return out

    def ipc_sparse_write(self, group: str, patch_id: str, metas: list[SparseMeta]) -> dict[int, IpcSparse]:
        self.hub.log("trainer", "ipc_sparse_write", group)
        out = {}
        for rank, sess in self.ipc[group].items():
            sid = f"s-{group}-{rank}"
            self.hub.shared[sid] = [SparsePatch(p.name, p.indices.clone(), p.values.clone())
                                    for p in self.patches[patch_id]]
            flat = [[p.name, "float32", list(self.params[p.name].shape), int(p.indices.numel())]
                    for p in self.patches[patch_id]]  # as the real trainer: the flat format (ipc_flat)
            out[rank] = IpcSparse(sid, {"staging_id": sid} if sess["staging"] != sid else None, "ipc_flat", flat)
            sess["staging"] = sid
        return out

    def ipc_sent(self, group: str) -> TransferStats:
        self.hub.log("trainer", "ipc_sent", group)
        nbytes = sum(p.numel() * p.element_size() for p in self.params.values())
        return TransferStats(bytes=nbytes, wire_bytes=nbytes, ms=0.1, messages=1)

    def sparse_plan(self, patch_id: str, encoding: str) -> list[SparseMeta]:
        self.hub.log("trainer", "sparse_plan", encoding)
        return [SparseMeta(p.name, "float32", list(self.params[p.name].shape), int(p.indices.numel()), encoding,
                           int(p.indices.numel()) * 8) for p in self.patches[patch_id]]

    def send_dense(self, group: str, bucket_bytes: int) -> TransferStats:
        self.hub.log("trainer", "send_dense", group)
        self.hub.send(group, ("dense", {n: p.clone() for n, p in self.params.items()}))
        nbytes = sum(p.numel() * p.element_size() for p in self.params.values())
        return TransferStats(bytes=nbytes, wire_bytes=nbytes, ms=0.1, messages=1, zero_copy=1)

    def send_sparse(self, group: str, patch_id: str, metas: list[SparseMeta]) -> TransferStats:
        self.hub.log("trainer", "send_sparse", group)
        patches = self.patches[patch_id]
        self.hub.send(group, ("sparse", patches))
        return TransferStats(bytes=payload_bytes(patches), wire_bytes=payload_bytes(patches), ms=0.1, messages=1)

    def send_dense_vllm(self, group: str, packed: bool = False) -> TransferStats:
        self.hub.log("trainer", "send_dense_vllm", group)
        return self.send_dense(group, 0)

    def send_sparse_vllm(self, group: str, patch_id: str) -> TransferStats:
        self.hub.log("trainer", "send_sparse_vllm", group)
        return self.send_sparse(group, patch_id, [])


class FakeEngine:
    """An engine core that implements engines/contract.EngineCore on fake weights."""

    kind = "reference"

    def __init__(self, hub: Hub, model: str, device: str = "cpu", options: dict | None = None):
        self.hub, self.model, self.device = hub, model, device
        self.transports = list((options or {}).get("transports") or hub.transports)
        self.params = baseline(model)
        self.group: tuple[str, int] | None = None
        self.ipc_map: dict | None = None
        self.paused = False
        self.name = f"engine-{id(self) % 10000}"
        self.frozen = threading.Event()  # set: a stopped process (SIGSTOP): no call answers while it is set

    def _stopped(self) -> None:
        while self.frozen.is_set():
            threading.Event().wait(0.05)

    def ready(self) -> EngineDetails:
        self._stopped()
        return EngineDetails(kind=self.kind, model=self.model, device=self.device, num_tensors=len(self.params),
                             transports=self.transports, gpu_uuid=self.hub.engine_gpu)

    def generate(self, prompts: list[str], max_new_tokens: int = 1) -> list[dict]:
        if self.paused:
            raise RuntimeError("engine is paused for a weight update")
        tok = int(sum(float(p.sum()) for p in self.params.values()) * 1000) % 997
        return [{"token_ids": [tok] * max_new_tokens, "text": ""} for _ in prompts]

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def param_metas(self) -> list[TensorMeta]:
        return param_metas(self.params.items())

    def fingerprint(self, names: list[str] | None = None) -> dict[str, str]:
        return fingerprint([(n, self.params[n]) for n in (names or self.params)])

    def join_group(self, rendezvous: dict, rank: int, transport: str, timeout_s: float = 300.0) -> None:
        self.hub.log(self.name, "join_group", rendezvous["name"])
        self._stopped()
        if transport not in self.transports:
            raise WireError(f"asked to join over {transport!r}; receives on {self.transports}")
        if transport == "cuda_ipc":  # map the export carried by the rendezvous
            self.ipc_map = {"export": rendezvous["exports"][str(rank)]["export_id"], "staging": None}
            self.group = (rendezvous["name"], rank)
            return
        self.hub.join(rendezvous["name"], rank, rendezvous["world_size"], timeout_s)
        self.group = (rendezvous["name"], rank)

    def leave_group(self) -> None:
        self.hub.log(self.name, "leave_group", self.group[0] if self.group else None)
        self._stopped()
        self.group, self.ipc_map = None, None

    def prepare_sync(self, update: DenseUpdate) -> None:
        self.hub.log(self.name, "prepare_sync")
        assert all(isinstance(m, TensorMeta) for m in update.metas)

    def recv_dense(self, update: DenseUpdate) -> ReceiveReport:
        if update.ipc is not None:
            weights = self._mapped(update.ipc, "export")
            for n, t in weights.items():
                self.params[n].copy_(t)
            return ReceiveReport(recv_ms=0.1, bytes=sum(m.nbytes for m in update.metas))
        kind, weights = self._take()
        assert kind == "dense"
        for n, t in weights.items():
            self.params[n].copy_(t)
        return ReceiveReport(recv_ms=0.1, bytes=sum(m.nbytes for m in update.metas))

    def recv_sparse(self, update: SparseUpdate) -> ReceiveReport:
        if update.ipc is not None:
            _apply(self.params, self._mapped(update.ipc, "staging"))
            return ReceiveReport(recv_ms=0.1, elements=sum(m.count for m in update.metas))
        kind, patches = self._take()
        assert kind == "sparse" and [m.name for m in update.metas] == [p.name for p in patches]
        _apply(self.params, patches)
        return ReceiveReport(recv_ms=0.1, elements=sum(m.count for m in update.metas))

    def shutdown(self) -> None:
        self.leave_group()

    def _mapped(self, ipc: Any, what: str) -> Any:
        """What a fake cuda_ipc sync reads: remap when the update carries a new export/staging, refuse a
        sync naming another id than the one mapped (as transfer.ipc does)."""
        self.hub.log(self.name, "recv")
        if self.ipc_map is None:
            raise WireError("engine is not in a cuda_ipc session")
        ident = ipc.export_id if what == "export" else ipc.staging_id
        given = ipc.export if what == "export" else ipc.staging
        if given is not None:
            self.ipc_map[what] = ident
            self.hub.log(self.name, f"map_{what}", ident)
        if self.ipc_map[what] != ident:
            raise WireError(f"IpcStaleLayoutError: sync names {ident}, mapped {self.ipc_map[what]}")
        return self.hub.shared[ident]

    def _take(self) -> Any:
        self.hub.log(self.name, "recv")
        self._stopped()
        if self.group is None:
            raise WireError("engine has not joined a transfer group")
        return self.hub.recv(*self.group)
