"""Which vLLM is installed and what it can do, by feature probes (never by version strings).

Every vLLM import of wsync goes through `_vllm` (or the probes here), inside functions, so importing
any module of this package never imports vllm. pyproject pins ``vllm>=0.23``: the generations are
A (0.23-0.24: sparse inside backend "nccl", static trainer helpers, runtime names, TP=1),
B (0.25-0.27: backend "sparse_nccl"), C (0.28: + stateful trainer engine) and D (0.29+: checkpoint
names + full_shape, TP/EP). An older vLLM, or none, reads as not installed (generation "none").
Gen A is checked against vLLM 0.24.0 on a GPU; B/C/D are UNVERIFIED."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EXTENSION_QUALNAME = "wsync.engines.vllm.worker.WsyncWorkerExtension"
WT = "vllm.distributed.weight_transfer"
M_BASE, M_NCCL, M_COMMON = WT + ".base", WT + ".nccl_engine", WT + ".nccl_common"
M_SPARSE, M_FACTORY = WT + ".sparse_nccl_engine", WT + ".factory"
M_CKPT = "vllm.model_executor.model_loader.checkpoint_weight_patch"
GENERATIONS = ("A", "B", "C", "D")


class VLLMUnsupportedError(RuntimeError):
    """A sync the installed vLLM cannot do (the message names the version)."""


def _vllm(name: str):
    """Import a vLLM module. Every vLLM import outside the probes goes through here (tests monkeypatch it)."""
    return importlib.import_module(name)


@dataclass(frozen=True)
class VLLMApi:
    """What the installed vLLM offers. `generation` is "A" | "B" | "C" | "D" | "none"."""

    version: str
    generation: str
    sparse_backend: str | None = None  # weight_transfer_config backend the engine runs: "nccl" (A) | "sparse_nccl"
    checkpoint_coords: bool = False  # D: sparse names/indices are checkpoint (HF) coordinates
    start_takes_checkpoint_format: bool = False  # A: start_weight_update(is_checkpoint_format=...)
    stateful_trainer: bool = False  # C/D: WeightTransferTrainerFactory trainer engines
    static_trainer_api: bool = False  # A/B: NCCLWeightTransferEngine.trainer_* statics
    packed_in_update_info: bool = False  # A/B: packing fields ride update_info (< 0.28)
    notes: tuple[str, ...] = ()

    @property
    def installed(self) -> bool:
        return self.generation in GENERATIONS

    @property
    def native_dense(self) -> bool:
        """vLLM's own dense receive exists in the engine's backend (A: dense and sparse share "nccl")."""
        return self.generation == "A"


def _make_api(gen: str, version: str, **extra) -> VLLMApi:
    static = gen in ("A", "B")
    return VLLMApi(version=version, generation=gen, sparse_backend="nccl" if gen == "A" else "sparse_nccl",
                   checkpoint_coords=gen == "D", start_takes_checkpoint_format=gen == "A",
                   stateful_trainer=gen in ("C", "D"), static_trainer_api=static, packed_in_update_info=static,
                   **extra)


def _probe(importer: Callable[[str], Any] | None):
    """(load, exists, attr). find_spec / import_module by default; `importer(name)` (a module, or
    ImportError) replaces both so a test can feed a fake module tree. A submodule that fails to
    import for any reason counts as absent."""

    def load(name: str):
        try:
            return importer(name) if importer else importlib.import_module(name)
        except Exception:
            if name == "vllm" and not isinstance(sys.exc_info()[1], ImportError):
                raise
            return None

    def exists(name: str) -> bool:
        if importer is not None or name in sys.modules:
            return load(name) is not None
        try:
            return importlib.util.find_spec(name) is not None
        except Exception:
            return False

    return load, exists, lambda module, name: getattr(load(module), name, None) if exists(module) else None


def fields_of(cls) -> dict:
    return dict(getattr(cls, "__dataclass_fields__", None) or {})


def detect_generation(importer: Callable[[str], Any] | None = None) -> VLLMApi:
    """The feature probes of the reference doc (§4), in its recommended order: D (checkpoint-patch
    loader + required SparseWeightPatch.full_shape), then B/C (separate sparse backend; C has the
    stateful sparse trainer engine), then A (update_kind on the base update info). Anything else
    (no vllm, a broken install, a vLLM before 0.23) is "none", with the reason in `notes`."""
    load, exists, attr = _probe(importer)
    try:
        root = load("vllm")
    except Exception as exc:  # a broken install (e.g. a torch/CUDA mismatch) counts as absent
        return VLLMApi("", "none", notes=(f"import vllm failed: {exc!r}",))
    if root is None:
        return VLLMApi("", "none", notes=("vllm is not installed",))
    v = str(getattr(root, "__version__", None) or "unknown")
    if exists(M_SPARSE) and exists(M_CKPT):
        f = fields_of(attr(M_SPARSE, "SparseWeightPatch") or attr(M_BASE, "SparseWeightPatch")).get("full_shape")
        if f is not None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            return _make_api("D", v)
    if exists(M_SPARSE):
        factory = attr(M_FACTORY, "WeightTransferTrainerFactory") or attr(WT, "WeightTransferTrainerFactory")
        mod = load(M_SPARSE)
        stateful = hasattr(mod, "SparseNCCLTrainerInitInfo") or not hasattr(
            getattr(mod, "SparseNCCLWeightTransferEngine", None), "trainer_send_weights")
        if factory is not None and stateful:
            return _make_api("C", v)
        return _make_api("B", v, notes=("trainer factory without a sparse trainer engine",) if factory else ())
    if "update_kind" in fields_of(attr(M_BASE, "WeightTransferUpdateInfo")):
        return _make_api("A", v)
    return VLLMApi(v, "none", notes=(f"vLLM {v} predates native sparse weight transfer (0.23.0); "
                                     "wsync supports vllm>=0.23",))


def require_installed(api: VLLMApi, what: str) -> None:
    if not api.installed:
        raise VLLMUnsupportedError(f"{what} needs vLLM >= 0.23 ({'; '.join(api.notes) or 'not installed'})")


def receive_plan(api: VLLMApi, *, extension_only: bool = False) -> dict[str, str]:
    """How a native-route engine receives each mode, decided once at start: "native" (vLLM's
    weight-transfer engine) or "extension" (WsyncWorkerExtension.wsync_recv_dense/sparse over the same
    communicator and the same bytes). Dense into a 'sparse_nccl' engine (B-D) can only be "extension":
    vLLM runs one backend per engine and that one takes no dense round. `extension_only` forces the
    extension for both (exercises the reseed path on Gen A)."""
    require_installed(api, "a vLLM sync")
    if extension_only:
        return {"dense": "extension", "sparse": "extension"}
    return {"dense": "native" if api.native_dense else "extension", "sparse": "native"}


def check_packed(api: VLLMApi, plan: dict[str, str]) -> None:
    """Packed dense exists only through vLLM's own dense receive (backend 'nccl', Gen A)."""
    if plan["dense"] != "native":
        raise VLLMUnsupportedError(f"vLLM {api.version} (Gen {api.generation}): packed dense needs vLLM's own "
                                   "'nccl' dense receive; this engine receives dense through the worker "
                                   "extension, unpacked only")
