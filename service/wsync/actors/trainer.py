"""The trainer: owns the policy weights, prepares patches, resets to the baseline, sends updates."""

from __future__ import annotations

import time

import torch

from wsync.engines.hf import greedy_generate, load_causal_lm, named_params, resolve_device, set_cpu_threads
from wsync.patches import apply_inline, patch_digest, random_patch, reference_patch
from wsync.publish.source import WeightSource
from wsync.publish.wire import diff_source, send_patches, send_source_dense
from wsync.schemas import TrainerInfo, TrainerStepResult
from wsync.transfer.delta import Snapshot
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.flat import flatten_params
from wsync.transfer.group import Rendezvous, backend_for, free_port, open_group
from wsync.transfer.meta import TensorMeta, TransferStats, param_metas
from wsync.transfer.sparse import SparseMeta, SparsePatch, payload_bytes, plan_sparse

from .trainer_ipc import TrainerIpcMixin, gpu_uuid_of


#: Patches the trainer keeps for sparse syncs; older ones must be re-prepared (or synced dense).
MAX_HELD_PATCHES = 64


class TrainerError(RuntimeError):
    pass


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # not inside Ray
        return "127.0.0.1"


class TrainerCore(TrainerIpcMixin):
    """The trainer actor's core; its cuda_ipc side is TrainerIpcMixin (actors/trainer_ipc.py)."""

    def __init__(self, device: str | None = None, max_snapshots: int = 1, bucket_bytes: int | None = None):
        self.device = resolve_device(device)
        set_cpu_threads(self.device)
        self.model_name: str | None = None
        self.dtype = "bfloat16"
        self.lm = self.tokenizer = None
        self.params: dict[str, torch.Tensor] = {}
        self.version: str | None = None
        self.patches: dict[str, list[SparsePatch]] = {}
        self.patch_targets: dict[str, str] = {}  # patch id -> the trainer version base + patch equals
        self.groups: dict[str, tuple[str, object]] = {}
        self._abandoned: set[str] = set()  # groups closed while (possibly) still opening
        self.optimizer = None
        # Copies (on the trainer's device) of weight versions engines serve, for bit-exact deltas.
        self.synced = Snapshot()
        self.max_snapshots = max_snapshots
        self.bucket_bytes = bucket_bytes  # parameters are laid out in the dense wire's buckets (zero copy)

    # ---- model --------------------------------------------------------------------------
    def load(self, model: str, dtype: str = "bfloat16") -> TrainerInfo:
        self.lm, self.tokenizer = load_causal_lm(model, dtype, self.device)
        self.model_name, self.dtype = model, dtype
        self.params = named_params(self.lm)
        if self.bucket_bytes:
            flatten_params(self.params, self.bucket_bytes)
        self.version = f"base:{model}"
        self.optimizer = None
        return self.info()

    def reset(self) -> TrainerInfo:
        """Back to the baseline checkpoint (reloaded from disk, as the reference example does)."""
        self._require_model()
        return self.load(self.model_name, self.dtype)

    # ---- stash: a comparison runs on its own state and gives the user's back ------------------
    _STASHED = ("model_name", "dtype", "lm", "tokenizer", "params", "version", "patches", "patch_targets",
                "optimizer", "synced")

    def stash(self) -> TrainerInfo:
        """Put the whole trainer state aside (model, weights, version, held patches, optimizer, delta
        snapshots) and continue on a fresh load of the same model. References, not copies: the fresh
        load builds new tensors, so the stashed ones stay exactly as they were (the cost is the memory
        of a second model until ``unstash``)."""
        self._require_model()
        self._stash = {k: getattr(self, k) for k in self._STASHED}
        self.patches, self.patch_targets, self.synced = {}, {}, Snapshot()
        return self.load(self.model_name, self.dtype)

    def unstash(self) -> TrainerInfo:
        """Back to the stashed state, bit for bit; what ran since (patches, snapshots) is dropped."""
        saved = getattr(self, "_stash", None)
        if saved is None:
            raise TrainerError("nothing stashed")
        for key, value in saved.items():
            setattr(self, key, value)
        self._stash = None
        return self.info()

    def info(self) -> TrainerInfo:
        if self.lm is None:
            return TrainerInfo(loaded=False)
        metas = self.param_metas()
        return TrainerInfo(loaded=True, model=self.model_name, dtype=self.dtype, device=str(self.device),
                           version=self.version, num_tensors=len(metas), num_params=sum(m.numel for m in metas),
                           param_bytes=sum(m.nbytes for m in metas), gpu_uuid=gpu_uuid_of(self.device))

    def param_metas(self) -> list[TensorMeta]:
        """Every parameter in the dense wire's order (what a DenseUpdate carries)."""
        return param_metas(self.params.items())

    def generate(self, prompts: list[str], max_new_tokens: int = 1) -> list[dict]:
        self._require_model()
        return greedy_generate(self.lm, self.tokenizer, prompts, max_new_tokens, self.device)

    def fingerprint(self, names: list[str] | None = None) -> dict[str, str]:
        items = self.params.items() if names is None else [(n, self.params[n]) for n in names]
        return fingerprint(items)

    # ---- patches ------------------------------------------------------------------------
    def prepare_patch(self, patch_id: str, kind: str, spec: dict) -> dict:
        """Apply a patch to the trainer's weights and keep it for sparse syncs."""
        self._require_model()
        base = self.version
        with torch.no_grad():
            if kind == "reference":
                prepared = reference_patch(self.lm, self.tokenizer, spec["prompts"], spec["rows"], spec["param"])
            elif kind == "random":
                prepared = random_patch(self.lm, spec["density"], spec.get("params"), spec.get("seed", 0))
            elif kind == "inline":
                prepared = apply_inline(self.lm, [self._to_device(p) for p in spec["patches"]])
            else:
                raise TrainerError(f"unknown patch kind {kind!r}")
        self._hold(patch_id, prepared.patches, target=patch_id)
        self.version = patch_id
        return {"base_version": base, **self._summary(prepared.patches), "payload_bytes": prepared.payload_bytes,
                "digest": prepared.digest, "selected_token_ids": prepared.selected_token_ids}

    # ---- training and real deltas ---------------------------------------------------------
    def step(self, step_id: str, texts: list[str], optimizer: str, lr: float, steps: int) -> TrainerStepResult:
        """Real optimizer steps (causal-LM loss on ``texts``): the weights move as training moves them."""
        self._require_model()
        if self.optimizer is None or self.optimizer[0] != (optimizer, lr):
            params = list(self.params.values())
            opt = torch.optim.AdamW(params, lr=lr) if optimizer == "adamw" else torch.optim.SGD(params, lr=lr)
            self.optimizer = ((optimizer, lr), opt)
        opt = self.optimizer[1]
        batch = self.tokenizer(list(texts), return_tensors="pt", padding=True).to(self.device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        t0, losses = time.perf_counter(), []
        self.lm.train()
        try:
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = self.lm(**batch, labels=labels).loss
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            self.lm.eval()
            opt.zero_grad(set_to_none=True)
        self._sync_device()
        self.version = step_id
        return TrainerStepResult(version=step_id, losses=losses, step_ms=(time.perf_counter() - t0) * 1e3)

    def prepare_delta(self, patch_id: str, base_version: str) -> dict:
        """The bit-exact difference between the snapshot of ``base_version`` and the current weights."""
        self._require_model()
        if base_version not in self.synced:
            raise TrainerError(f"the trainer keeps no snapshot of version {base_version!r} (it keeps "
                               f"{self.synced.keys() or 'none'}); sync dense first")
        self._sync_device()
        t0 = time.perf_counter()
        patches, _ = diff_source(self.synced, base_version, self._source(), self.bucket_bytes or 1)
        self._sync_device()
        diff_s = time.perf_counter() - t0
        self._hold(patch_id, patches, target=self.version)
        compared = 2 * sum(p.numel() * p.element_size() for p in self.params.values())
        return {
            "base_version": base_version, "target_version": self.version, **self._summary(patches),
            "payload_bytes": payload_bytes(patches), "digest": patch_digest(patches),
            "diff_ms": diff_s * 1e3, "diff_gbps": compared / diff_s / 1e9 if diff_s > 0 else None,
        }

    def mark_synced(self, version: str, patch_id: str | None, base_version: str | None, keep: list[str]) -> list[str]:
        """Engines now serve ``version``. Keep a snapshot of it (moving the base's copy forward by the
        patch when no engine needs the base any more, O(changed); else a full device copy) and drop
        snapshots of versions no engine serves. Returns the versions kept."""
        if self.max_snapshots > 0 and version == self.version and version not in self.synced:
            if patch_id is not None and base_version in self.synced and base_version not in keep:
                self.synced.update(base_version, self._patch(patch_id))
                self.synced.rename(base_version, version)
            else:
                self.synced.refresh(version, self.params)
        others = [k for k in self.synced.keys() if k != version]
        for key in others:
            if key not in keep:
                self.synced.drop(key)
        kept = self.synced.keys()
        for key in [k for k in kept if k != version][: max(0, len(kept) - self.max_snapshots)]:
            self.synced.drop(key)
        if self.max_snapshots <= 0:
            self.synced.drop(version)
        return self.synced.keys()

    def _current_params(self, patch_id: str) -> dict[str, torch.Tensor] | None:
        """The trainer's tensors may stand in for a patch (dense encoding) only while they are
        exactly base + this patch, i.e. nothing moved them on since."""
        return self.params if self.patch_targets.get(patch_id) == self.version else None

    def sparse_plan(self, patch_id: str, encoding: str) -> list[SparseMeta]:
        specs = {m.name: m for m in param_metas(self.params.items())}
        return plan_sparse(self._patch(patch_id), specs, encoding, self._current_params(patch_id))

    # ---- transfer groups ----------------------------------------------------------------
    # The trainer keeps one open group per engine set (by name), so repeated syncs to the same engines
    # pay the rendezvous and communicator set-up once (wsync.sync.groups decides when to open/close).
    def rendezvous(self, world_size: int, name: str, backend: str | None = None, host: str | None = None) -> dict:
        """Where the group's store will listen: ``host`` (the service's rendezvous_host, loopback by
        default) or this node's address."""
        host = host or _node_ip()
        return {"host": host, "port": free_port(host), "world_size": world_size,
                "backend": backend or backend_for(self.device), "name": name}

    def open_group(self, rendezvous: dict, timeout_s: float = 30.0) -> None:
        """Open the trainer's side (rank 0). A close_group(name) that arrives (on the control lane) while
        this open still waits makes it close what it opened and fail: nothing outlives an abandoned open."""
        name = rendezvous["name"]
        self.close_group(name)
        self._abandoned.discard(name)
        group = open_group(Rendezvous(**rendezvous), 0, self.device, timeout_s=timeout_s)
        if name in self._abandoned:
            self._abandoned.discard(name)
            group.close(abort=True)
            raise TrainerError(f"transfer group {name} was abandoned while it opened")
        self.groups[name] = ("wsync", group)

    def open_vllm_group(self, rendezvous: dict, timeout_s: float = 300.0) -> None:
        """vLLM's own trainer-side communicator (its helper takes no timeout; ``timeout_s`` is accepted
        for the one open signature every transport uses)."""
        from wsync.engines import vllm as va

        self.close_group(rendezvous["name"])
        api = va.detect_generation()
        handle = va.trainer_open_group(api, rendezvous["host"], rendezvous["port"], rendezvous["world_size"])
        self.groups[rendezvous["name"]] = ("vllm", (api, handle))

    def close_group(self, name: str | None = None, abort: bool = False) -> None:
        """Close one group by name, or every group; ``abort``: tear the communicator down without waiting
        for peers (runs on the control lane, possibly while a send on it is stuck)."""
        if name is not None and name not in self.groups:
            self._abandoned.add(name)  # an open still in flight finds this and closes what it opened
            while len(self._abandoned) > 64:
                self._abandoned.pop()
        for key in [name] if name is not None else list(self.groups):
            kind, group = self.groups.pop(key, (None, None))
            if kind == "ipc":
                self.groups[key] = (kind, group)
                self.ipc_close(key)
            elif kind == "wsync":
                group.close(abort=abort)
            elif kind == "vllm":
                from wsync.engines import vllm as va

                va.trainer_close_group(group[1])

    def send_dense(self, group: str, bucket_bytes: int) -> TransferStats:
        stats, _ = send_source_dense(self._group(group, "wsync"), self._source(), bucket_bytes)
        return stats

    def send_sparse(self, group: str, patch_id: str, metas: list[SparseMeta]) -> TransferStats:
        """``bytes`` is the patch's payload (values + indices), whatever the encoding."""
        patches = self._patch(patch_id)
        stats = send_patches(self._group(group, "wsync"), patches, list(metas), self._current_params(patch_id))
        return TransferStats(bytes=payload_bytes(patches), wire_bytes=stats.wire_bytes, ms=stats.ms,
                             messages=stats.messages)

    # ---- transfer to vLLM engines: vLLM's own trainer-side helpers, so the wire is vLLM's --
    def send_dense_vllm(self, group: str, packed: bool = False) -> TransferStats:
        from wsync.engines import vllm as va

        api, handle = self._group(group, "vllm")
        ms = va.trainer_send_dense(api, handle, list(self.params.items()), packed=packed)
        nbytes = sum(p.numel() * p.element_size() for p in self.params.values())
        return TransferStats(bytes=nbytes, wire_bytes=nbytes, ms=ms, messages=0)

    def send_sparse_vllm(self, group: str, patch_id: str) -> TransferStats:
        from wsync.engines import vllm as va

        api, handle = self._group(group, "vllm")
        patches = self._patch(patch_id)
        ms = va.trainer_send_sparse(api, handle, patches)
        nbytes = payload_bytes(patches)
        return TransferStats(bytes=nbytes, wire_bytes=nbytes, ms=ms, messages=2 * len(patches))

    # ---- helpers ------------------------------------------------------------------------
    def _source(self) -> WeightSource:
        """The trainer's parameters as a publish source: names as they are (they are checkpoint names)."""
        return WeightSource(self.params, name_map=lambda name: name)

    def _require_model(self) -> None:
        if self.lm is None:
            raise TrainerError("trainer has no model loaded")

    def _summary(self, patches: list[SparsePatch]) -> dict:
        """The per-tensor part of a PatchInfo."""
        return {"tensors": [{"name": p.name, "dtype": str(p.values.dtype).removeprefix("torch."),
                             "shape": list(self.params[p.name].shape), "count": int(p.indices.numel())}
                            for p in patches],
                "num_elements": sum(int(p.indices.numel()) for p in patches)}

    def _hold(self, patch_id: str, patches: list[SparsePatch], target: str) -> None:
        """Keep a patch for sparse syncs; ``target`` is the version base + patch equals."""
        self.patches[patch_id], self.patch_targets[patch_id] = patches, target
        while len(self.patches) > MAX_HELD_PATCHES:  # oldest first: dicts keep insertion order
            oldest = next(iter(self.patches))
            self.patches.pop(oldest)
            self.patch_targets.pop(oldest, None)

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _group(self, name: str, kind: str):
        found = self.groups.get(name)
        if found is None or found[0] != kind:
            raise TrainerError(f"trainer has no open {kind} transfer group {name!r}")
        return found[1]

    def _patch(self, patch_id: str) -> list[SparsePatch]:
        try:
            return self.patches[patch_id]
        except KeyError:
            raise TrainerError(f"patch {patch_id} is not held by the trainer (it was reset or reloaded)") from None

    def _to_device(self, p: SparsePatch) -> SparsePatch:
        return SparsePatch(p.name, p.indices.to(self.device), p.values.to(self.device))
