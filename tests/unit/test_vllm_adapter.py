"""vllm_adapter on CPU without vLLM: import hygiene, generation detection on fake module trees (and on
the real vLLM 0.24.0 source read as text), require() messages, payload builders vs vLLM's dataclasses."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import subprocess
import sys
import textwrap
import types
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import pytest
import torch

from wsync.engines import vllm_adapter as va

SITE = Path("/tmp/devpack-build/site")
WT = va.WT


# ---- fake module trees --------------------------------------------------------------------------
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
class UpdateInfoOld:  # 0.16-0.20
    is_checkpoint_format: bool = True


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
    m = {"vllm": ns("vllm", __version__=version)}
    if gen == "legacy":
        return m
    m[WT] = ns(WT)
    m[va.M_FACTORY] = ns(va.M_FACTORY, WeightTransferEngineFactory=object)
    if gen in ("dense_only", "dense_old"):
        m[va.M_BASE] = ns(va.M_BASE, WeightTransferUpdateInfo=UpdateInfoOld if gen == "dense_old" else UpdateInfoEmpty)
        return m
    if gen == "A":
        m[va.M_BASE] = ns(va.M_BASE, WeightTransferUpdateInfo=UpdateInfoA, SparseWeightPatch=PatchA)
        return m
    m[va.M_BASE] = ns(va.M_BASE, WeightTransferUpdateInfo=UpdateInfoEmpty)
    m[va.M_COMMON] = ns(va.M_COMMON)
    if gen in ("B", "B27"):
        m[va.M_SPARSE] = ns(va.M_SPARSE, SparseWeightPatch=PatchA, SparseNCCLWeightTransferEngine=StaticSparseEngine)
        if gen == "B27":  # 0.26-0.27: trainer factory exists (IPC) but sparse is still static
            m[va.M_FACTORY].WeightTransferTrainerFactory = TrainerFactory
        return m
    m[va.M_FACTORY].WeightTransferTrainerFactory = TrainerFactory
    m[va.M_SPARSE] = ns(va.M_SPARSE, SparseWeightPatch=PatchD if gen == "D" else PatchC,
                        SparseNCCLWeightTransferEngine=StatefulSparseEngine, SparseNCCLTrainerInitInfo=object)
    if gen in ("D", "C_with_loader"):
        m[va.M_CKPT] = ns(va.M_CKPT, CheckpointWeightPatch=object)
    return m


def api_of(gen: str, version: str = "0.0.0") -> va.VLLMApi:
    modules = {} if gen == "none" else tree(gen, version)
    return va.detect_generation(importer=make_importer(modules))


# ---- import hygiene -----------------------------------------------------------------------------
def test_module_import_does_not_import_vllm(tmp_path):
    """A poisoned `vllm` package on sys.path: importing the adapter and the engine must not touch it."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise RuntimeError('vllm was imported')\n")
    code = textwrap.dedent("""
        import sys
        import wsync.engines.vllm_adapter as va
        import wsync.actors.vllm_engine
        assert not [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]
        api = va.detect_generation()  # probing does import vllm: the broken install reads as "none"
        assert api.generation == "none" and "vllm was imported" in api.notes[0], api
        print("ok")
    """)
    src = str(Path(va.__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": f"{tmp_path}:{src}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_in_process_sys_modules_clean():
    assert "vllm" not in sys.modules
    assert not [m for m in sys.modules if m.startswith("vllm.")]


# ---- detection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("gen,version,expect", [
    ("A", "0.24.0", "A"), ("B", "0.25.0", "B"), ("B27", "0.27.1", "B"), ("C", "0.28.0", "C"),
    ("C_with_loader", "0.28.9", "C"), ("D", "0.33.0", "D"), ("dense_only", "0.22.1", "dense_only"),
    ("dense_old", "0.18.0", "dense_only"), ("legacy", "0.10.1", "legacy"),
])
def test_detect_generation_fake_trees(gen, version, expect):
    api = api_of(gen, version)
    assert (api.generation, api.version) == (expect, version)


def test_detect_flags_per_generation():
    a, b, c, d = (api_of(g) for g in "ABCD")
    assert a.supports_sparse and a.sparse_backend == "nccl" and a.start_takes_checkpoint_format
    assert a.static_trainer_api and a.packed_in_update_info and not a.stateful_trainer
    for x in (b, c, d):
        assert x.supports_sparse and x.sparse_backend == "sparse_nccl" and not x.start_takes_checkpoint_format
    assert b.static_trainer_api and not b.stateful_trainer
    assert c.stateful_trainer and d.stateful_trainer and not c.checkpoint_coords
    assert d.checkpoint_coords and d.tp_sparse and not c.tp_sparse
    new, old = api_of("dense_only"), api_of("dense_old")
    assert not new.supports_sparse and new.start_takes_checkpoint_format and new.has_start_finish
    assert not old.has_start_finish and not old.start_takes_checkpoint_format
    leg = api_of("legacy")
    assert leg.dense_backend is None and not leg.has_start_finish and leg.installed


def test_detect_none_and_broken():
    assert va.detect_generation(importer=make_importer({})).generation == "none"

    def broken(name):
        raise RuntimeError("libcudart.so: cannot open shared object file")

    api = va.detect_generation(importer=broken)
    assert api.generation == "none" and not api.installed and "libcudart" in api.notes[0]


def test_detect_via_sys_modules(monkeypatch):
    """The default probe (find_spec / import_module) over fake modules placed in sys.modules."""
    for name, mod in tree("A", "0.23.0").items():
        monkeypatch.setitem(sys.modules, name, mod)
    api = va.detect_generation()
    assert (api.generation, api.version) == ("A", "0.23.0")


# ---- the real vLLM 0.24.0 source, read as text ---------------------------------------------------
def _src(module: str) -> Path:
    base = SITE / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _classes(module: str) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in ast.parse(_src(module).read_text()).body if isinstance(n, ast.ClassDef)}


def class_fields(module: str, cls: str) -> dict[str, bool]:
    """Annotated dataclass fields -> has a default (KW_ONLY markers skipped)."""
    out = {}
    for n in _classes(module)[cls].body:
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and "KW_ONLY" not in ast.unparse(n.annotation):
            out[n.target.id] = n.value is not None
    return out


def class_methods(module: str, cls: str) -> dict[str, list[str]]:
    return {n.name: [a.arg for a in n.args.args + n.args.kwonlyargs]
            for n in _classes(module)[cls].body if isinstance(n, ast.FunctionDef)}


def source_importer(name: str):
    """A module stub per real source file: classes with their dataclass fields and methods."""
    if name == "vllm":
        version = re.search(r"__version__ = version = '([^']+)'", (SITE / "vllm/_version.py").read_text())
        return ns("vllm", __version__=version.group(1))
    path = _src(name)
    if not path.exists():
        raise ModuleNotFoundError(name)
    mod = ns(name)
    for cname in _classes(name):
        attrs = {m: (lambda *a, **k: None) for m in class_methods(name, cname)}
        attrs["__dataclass_fields__"] = {f: dataclasses.field(default=None) if has else dataclasses.field()
                                         for f, has in class_fields(name, cname).items()}
        setattr(mod, cname, type(cname, (), attrs))
    return mod


needs_source = pytest.mark.skipif(not (SITE / "vllm/_version.py").exists(), reason="vLLM 0.24.0 source not unpacked")


@needs_source
def test_real_0_24_source_is_gen_a():
    api = va.detect_generation(importer=source_importer)
    assert (api.generation, api.version) == ("A", "0.24.0")


@needs_source
def test_builders_match_vllm_0_24_dataclasses():
    upd = {**class_fields(va.M_BASE, "WeightTransferUpdateInfo"),
           **class_fields(va.M_NCCL, "NCCLWeightTransferUpdateInfo")}
    required = {f for f, has_default in upd.items() if not has_default}
    api = api_of("A", "0.24.0")
    metas = [{"name": "w", "dtype": "bfloat16", "shape": [4, 2], "count": 3}]
    for info in (va.dense_update_info(metas, False, api), va.dense_update_info(metas, True, api,
                 packed_buffer_size_bytes=1 << 20, packed_num_buffers=3), va.sparse_update_info(metas, api)):
        assert set(info) <= set(upd) and required <= set(info), (info, upd)
    assert set(va.init_info("h", 1, 2)) == set(class_fields(va.M_NCCL, "NCCLWeightTransferInitInfo"))
    assert {"group", "packed", "packed_buffer_size_bytes"} <= set(class_fields(va.M_NCCL, "NCCLTrainerSendWeightsArgs"))
    assert list(class_fields(va.M_BASE, "SparseWeightPatch")) == ["name", "indices", "values"]
    assert "backend" in class_fields("vllm.config.weight_transfer", "WeightTransferConfig")
    statics = class_methods(va.M_NCCL, "NCCLWeightTransferEngine")
    assert statics["trainer_init"] == ["init_info"]
    assert statics["trainer_send_weights"] == statics["trainer_send_sparse_weights"] == ["iterator", "trainer_args"]


@needs_source
def test_vllm_0_24_llm_and_worker_surface():
    llm = class_methods("vllm.entrypoints.llm", "LLM")
    assert llm["start_weight_update"] == ["self", "is_checkpoint_format"]
    assert llm["sleep"] == ["self", "level", "mode"] and llm["wake_up"] == ["self", "tags"]
    for m in ("init_weight_transfer_engine", "update_weights", "finish_weight_update", "collective_rpc",
              "reset_prefix_cache", "generate", "get_world_size"):
        assert m in llm
    worker = class_methods("vllm.v1.worker.gpu_worker", "Worker")
    assert worker["start_weight_update"] == ["self", "is_checkpoint_format"]
    assert "apply_sparse_weight_patches" in class_methods("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")
    # worker_extension_cls must not clash with anything on the worker (vLLM asserts it)
    ours = {a for a in dir(va.WsyncWorkerExtension) if not a.startswith("__")}
    theirs = set(worker) | set(class_methods("vllm.v1.worker.worker_base", "WorkerBase"))
    assert ours and not ours & theirs
    assert "distributed_executor_backend" in class_fields("vllm.config.parallel", "ParallelConfig")


# ---- require / routes ---------------------------------------------------------------------------
def test_require_sparse_before_0_23_names_version():
    api = api_of("dense_only", "0.22.1")
    with pytest.raises(va.VLLMUnsupportedError, match=r"vLLM 0\.22\.1 has no native sparse.*0\.23\.0"):
        va.require(api, "sparse")
    assert va.require(api, "sparse", allow_extension=True) == "extension"
    assert va.require(api, "dense") == "native"


def test_require_dense_into_sparse_nccl_engine_explains_reseed():
    for gen, version in (("B", "0.25.0"), ("D", "0.29.0")):
        api = api_of(gen, version)
        with pytest.raises(va.VLLMUnsupportedError) as e:
            va.require(api, "dense")
        msg = str(e.value)
        assert f"vLLM {version}" in msg and "sparse_nccl" in msg and "Reseed plan" in msg
        assert va.EXTENSION_QUALNAME in msg and "wsync_recv_dense" in msg
        assert va.require(api, "dense", allow_extension=True) == "extension"
        assert va.require(api, "dense", backend="nccl") == "native"  # a dense-only engine of that version
        with pytest.raises(va.VLLMUnsupportedError, match=f"vLLM {version}.*packed"):
            va.require(api, "dense_packed", allow_extension=True)


def test_require_misc():
    a = api_of("A", "0.24.0")
    assert va.routes(a) == {"dense": "native", "sparse": "native"}
    assert va.require(a, "dense_packed") == "native"
    with pytest.raises(va.VLLMUnsupportedError, match=r"0\.24\.0.*TP=1"):
        va.require(a, "sparse", tensor_parallel_size=2)
    assert va.require(api_of("D", "0.30.0"), "sparse", tensor_parallel_size=2) == "native"
    assert va.routes(api_of("C")) == {"dense": "extension", "sparse": "native"}
    assert va.routes(api_of("legacy")) == {"dense": "extension", "sparse": "extension"}
    with pytest.raises(va.VLLMUnsupportedError, match=r"0\.10\.1 predates"):
        va.require(api_of("legacy", "0.10.1"), "dense")
    with pytest.raises(va.VLLMUnsupportedError, match="not installed"):
        va.require(api_of("none"), "dense")
    with pytest.raises(ValueError):
        va.require(a, "bogus")


# ---- payload builders ---------------------------------------------------------------------------
METAS = [{"name": "model.embed_tokens.weight", "dtype": "bfloat16", "shape": [10, 4]},
         {"name": "model.norm.weight", "dtype": "torch.float32", "shape": [4]}]


def test_dense_update_info_gen_a_is_reference_dict():
    info = va.dense_update_info(METAS, False, api_of("A"))
    assert info == {"names": ["model.embed_tokens.weight", "model.norm.weight"],
                    "dtype_names": ["bfloat16", "float32"], "shapes": [[10, 4], [4]], "packed": False}
    packed = va.dense_update_info(METAS, True, api_of("A"), packed_buffer_size_bytes=64)
    assert packed["packed"] is True and packed["packed_buffer_size_bytes"] == 64
    assert "packed" not in va.dense_update_info(METAS, False, api_of("D"))
    with pytest.raises(va.VLLMUnsupportedError):
        va.dense_update_info(METAS, True, api_of("D"))


def test_sparse_update_info_shapes_per_generation():
    metas = [{"name": "model.embed_tokens.weight", "dtype": "bfloat16", "shape": [10, 4], "count": 8}]
    a = va.sparse_update_info(metas, api_of("A"))
    assert a == {"names": ["model.embed_tokens.weight"], "dtype_names": ["bfloat16"], "shapes": [[10, 4]],
                 "num_updates_list": [8], "update_kind": "sparse_flat"}
    for gen in "BCD":
        info = va.sparse_update_info(metas, api_of(gen))
        assert list(info) == ["names", "dtype_names", "shapes", "num_updates_list"]
    # from patch objects: dtype from values, count from indices, shape from `shapes`
    patch = types.SimpleNamespace(name="w", indices=torch.arange(3, dtype=torch.int32),
                                  values=torch.zeros(3, dtype=torch.bfloat16))
    info = va.sparse_update_info([patch], api_of("D"), shapes={"w": (5, 2)})
    assert info == {"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[5, 2]], "num_updates_list": [3]}
    with pytest.raises(ValueError, match="shape"):
        va.sparse_update_info([patch], api_of("D"))


def test_init_info():
    assert va.init_info("10.0.0.1", "29500", 3, rank_offset=2) == {
        "master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 2, "world_size": 3}
    assert va.init_info("h", 1, 2)["rank_offset"] == 1
    assert va.init_info("h", 1, 2, packed=True)["packed"] is True


def test_payload_bytes():
    assert va.dense_payload_bytes(METAS) == 10 * 4 * 2 + 4 * 4
    params = [torch.zeros(10, 4, dtype=torch.bfloat16), torch.zeros(4)]
    assert va.dense_payload_bytes(METAS) == sum(p.numel() * p.element_size() for p in params)
    sparse = [{"name": "a", "dtype": "bfloat16", "shape": [9], "count": 5},
              {"name": "b", "dtype": "float32", "shape": [9], "count": 2}]
    assert va.sparse_payload_bytes(sparse) == 5 * 4 + 5 * 2 + 2 * 4 + 2 * 4
    patch = types.SimpleNamespace(name="w", indices=torch.arange(7, dtype=torch.int32),
                                  values=torch.ones(7, dtype=torch.float16))
    assert va.sparse_payload_bytes([patch]) == 7 * 4 + 7 * 2 == patch.indices.nbytes + patch.values.nbytes
    assert va.itemsize("float8_e4m3fn") == 1 and va.itemsize(torch.float64) == 8
    assert math.prod([]) == 1 and va.dense_payload_bytes([{"name": "s", "dtype": "float32", "shape": []}]) == 4


def test_engine_kwargs():
    def factory(backend):
        return {"backend": backend}

    kw = va.engine_kwargs(api_of("A"), "both", 0.6, True, max_model_len=512, config_factory=factory)
    assert kw == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.6, "enforce_eager": True,
                  "dtype": "bfloat16", "distributed_executor_backend": "uni", "max_model_len": 512,
                  "worker_extension_cls": va.EXTENSION_QUALNAME, "weight_transfer_config": {"backend": "nccl"}}
    for gen, mode, backend in (("D", "both", "sparse_nccl"), ("B", "sparse", "sparse_nccl"), ("C", "dense", "nccl"),
                               ("dense_only", "both", "nccl")):
        assert va.engine_kwargs(api_of(gen), mode, config_factory=factory)["weight_transfer_config"] == {"backend": backend}
    assert "weight_transfer_config" not in va.engine_kwargs(api_of("legacy"), config_factory=factory)
    with pytest.raises(va.VLLMUnsupportedError):
        va.engine_kwargs(api_of("none"), config_factory=factory)
