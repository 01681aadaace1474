"""The one engine contract: what every engine core (reference, vLLM, test fakes) implements, and the
typed messages the sync layer and the trainer exchange with it.

An engine core is a plain class (the actors layer wraps it in ``ray.remote``; fast tests call it in
process). The sync layer never branches on the engine's kind: it asks the engine which transports it
can receive on (``EngineDetails.transports``), picks one transport object once per engine
(``wsync.sync.transports``), and then drives only the methods below.

Messages are dataclasses (picklable by Ray, no torch tensors inside): metas travel as
``TensorMeta`` / ``SparseMeta`` from ``wsync.transfer``, never as dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from wsync.transfer.meta import TensorMeta
from wsync.transfer.sparse import SparseMeta


def normalize_gpu_uuid(uuid: str | None) -> str:
    """A GPU UUID without its "GPU-" prefix(es), lower case ("" when unknown): torch, NVML and vLLM
    spell the same GPU differently."""
    u = (uuid or "").strip().lower()
    while u.startswith("gpu-"):
        u = u[4:]
    return u


@dataclass
class EngineDetails:
    """What an engine reports once it is ready."""

    kind: str
    model: str
    device: str
    num_tensors: int
    #: transports this engine can receive on, best first (names from the transport registry)
    transports: list[str] = field(default_factory=list)
    #: physical GPU UUID ("GPU-…") where the engine's weights live; None on CPU
    gpu_uuid: str | None = None
    #: engine-specific facts shown to operators (vLLM generation, route notes, …); JSON-able
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class IpcDense:
    """One dense sync over the "cuda_ipc" transport: copy from the trainer export ``export_id``.
    ``export`` (transfer.ipc.IpcExport.to_dict(): plain data) comes along only when the trainer's
    layout or buffers changed since the engine mapped them; the engine maps it first. An engine
    whose mapping is not ``export_id`` refuses (transfer.ipc.IpcStaleLayoutError) before any copy."""

    export_id: str
    export: dict | None = None


IPC_STAGED = "staged"
IPC_FLAT = "ipc_flat"  # = transfer.ipc_flat.FLAT_IPC


@dataclass
class IpcSparse:
    """One sparse sync over "cuda_ipc": the trainer wrote it into staging ``staging_id``; ``staging``
    (IpcStaging.export()) only when the buffer is new. ``fmt``: IPC_FLAT (what the service's trainer
    writes: transfer/ipc_flat.py layout, ``flat`` = its metas as plain lists [name, dtype, shape, count]
    in flat order) or IPC_STAGED (the per-tensor encoded stream of transfer/ipc_sparse.py described by
    the update's SparseMetas; kept for a sender that stages encoded streams, the service does not)."""

    staging_id: str
    staging: dict | None = None
    fmt: str = "staged"
    flat: list | None = None


@dataclass
class DenseUpdate:
    """Every parameter, by checkpoint name, in the dense wire's order and buckets. ``ipc``: set only on
    the cuda_ipc transport (what to copy from)."""

    metas: list[TensorMeta]
    bucket_bytes: int
    packed: bool = False
    ipc: IpcDense | None = None


@dataclass
class SparseUpdate:
    """Only changed elements: one SparseMeta per tensor, in the wire's order. ``ipc``: set only on the
    cuda_ipc transport (where the trainer staged the stream)."""

    metas: list[SparseMeta]
    ipc: IpcSparse | None = None


@dataclass
class ReceiveReport:
    """What one engine's receive cost."""

    recv_ms: float
    bytes: int = 0
    elements: int = 0
    messages: int = 0
    zero_copy: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class EngineCore(Protocol):
    """Every engine core implements these; the sync layer calls nothing else (``SamplingEngine.sample``,
    below, is optional)."""

    kind: str

    def ready(self) -> EngineDetails: ...

    def generate(self, prompts: list[str], max_new_tokens: int = 1) -> list[dict]: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def param_metas(self) -> list[TensorMeta]: ...

    def fingerprint(self, names: list[str] | None = None) -> dict[str, str]: ...

    def join_group(self, rendezvous: dict, rank: int, transport: str, timeout_s: float = 300.0) -> None:
        """Join the trainer's transfer group at ``rank`` (>= 1; the trainer is 0) over ``transport`` (one
        of ``ready().transports``); blocks until every rank joined. ``timeout_s``: the service's group
        timeout (Settings.group_timeout_s), for the communicator and its rendezvous. On "cuda_ipc" the
        rendezvous carries ``exports[str(rank)]`` (the trainer's IpcExport as plain data), which the
        engine maps here (an export from another GPU raises transfer.ipc.IpcDeviceError)."""

    def leave_group(self) -> None: ...

    def prepare_sync(self, update: DenseUpdate) -> None:
        """Build whatever the receive needs (maps, plans) before any byte moves; may be a no-op."""

    def recv_dense(self, update: DenseUpdate) -> ReceiveReport: ...

    def recv_sparse(self, update: SparseUpdate) -> ReceiveReport: ...

    def shutdown(self) -> None: ...


@runtime_checkable
class SamplingEngine(Protocol):
    """Optional: engines that serve RL rollouts (POST /v1/engines/{id}/sample). ``n`` completions of
    exactly ``max_new_tokens`` tokens per prompt; per prompt a dict with ``prompt_ids``, ``token_ids``
    [n][T], ``logprobs`` [n][T] (the sampled tokens' log-probabilities under the engine's weights) and
    ``texts``. Raises while paused for a weight update."""

    def sample(self, prompts: list[str], n: int = 1, max_new_tokens: int = 16, temperature: float = 1.0,
               top_k: int = 0, seed: int = 0) -> list[dict]: ...
