"""Fake vLLM module trees for detection tests: `api_of("A")` is what wsync.engines.vllm.detect
reads from a vLLM of that generation, without vLLM installed."""

from __future__ import annotations

import types
from dataclasses import KW_ONLY, dataclass

from wsync.engines.vllm import detect
from wsync.engines.vllm.detect import M_BASE, M_CKPT, M_COMMON, M_FACTORY, M_SPARSE, WT


def make_importer(modules: dict):
    """importer(name) over a dict of name -> module; anything else raises ModuleNotFoundError."""

    def importer(name: str):
        if name in modules:
            return modules[name]
        raise ModuleNotFoundError(f"No module named {name!r}")

    return importer


def ns(name: str, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


@dataclass
class UpdateInfoA:  # vLLM 0.23-0.24 base.WeightTransferUpdateInfo
    _: KW_ONLY
    update_kind: str = "dense"
    num_updates_list: list | None = None


@dataclass
class UpdateInfoEmpty:  # 0.21-0.22 / 0.25+
    pass


@dataclass
class PatchA:
    name: str
    indices: object
    values: object


@dataclass
class PatchC:
    name: str
    indices: object
    values: object
    full_shape: tuple | None = None


@dataclass
class PatchD:
    name: str
    indices: object
    values: object
    full_shape: tuple


class StaticSparseEngine:  # Gen B: static trainer API on the sparse engine
    @staticmethod
    def trainer_send_weights(iterator, args):
        pass


class StatefulSparseEngine:  # C/D: no static trainer_send_weights
    pass


class TrainerFactory:
    pass


def tree(gen: str, version: str = "0.0.0") -> dict:
    """Modules of a vLLM of generation `gen`: A, B, B27, C, C_with_loader, D, or "old" (0.16-0.22: dense
    weight transfer only, which wsync no longer supports) and "bare" (no weight_transfer package)."""
    m = {"vllm": ns("vllm", __version__=version)}
    if gen == "bare":
        return m
    m[WT] = ns(WT)
    m[M_FACTORY] = ns(M_FACTORY, WeightTransferEngineFactory=object)
    if gen == "old":
        m[M_BASE] = ns(M_BASE, WeightTransferUpdateInfo=UpdateInfoEmpty)
        return m
    if gen == "A":
        m[M_BASE] = ns(M_BASE, WeightTransferUpdateInfo=UpdateInfoA, SparseWeightPatch=PatchA)
        return m
    m[M_BASE] = ns(M_BASE, WeightTransferUpdateInfo=UpdateInfoEmpty)
    m[M_COMMON] = ns(M_COMMON)
    if gen in ("B", "B27"):
        m[M_SPARSE] = ns(M_SPARSE, SparseWeightPatch=PatchA, SparseNCCLWeightTransferEngine=StaticSparseEngine)
        if gen == "B27":  # 0.26-0.27: trainer factory exists (IPC) but sparse is still static
            m[M_FACTORY].WeightTransferTrainerFactory = TrainerFactory
        return m
    m[M_FACTORY].WeightTransferTrainerFactory = TrainerFactory
    m[M_SPARSE] = ns(M_SPARSE, SparseWeightPatch=PatchD if gen == "D" else PatchC,
                     SparseNCCLWeightTransferEngine=StatefulSparseEngine, SparseNCCLTrainerInitInfo=object)
    if gen in ("D", "C_with_loader"):
        m[M_CKPT] = ns(M_CKPT, CheckpointWeightPatch=object)
    return m


def api_of(gen: str, version: str = "0.0.0") -> detect.VLLMApi:
    modules = {} if gen == "none" else tree(gen, version)
    return detect.detect_generation(importer=make_importer(modules))
