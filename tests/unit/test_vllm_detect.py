"""wsync.engines.vllm on CPU without vLLM: import hygiene (the package is the only place importing vllm,
and importing it never does), generation detection on fake module trees (and on the real vLLM 0.24.0
source read as text), receive plans, payload builders vs vLLM's dataclasses."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from tests.fakes.vllm_modules import api_of, make_importer, ns, tree
from wsync.engines.vllm import detect as va
from wsync.engines.vllm import payloads as vp
from wsync.engines.vllm.worker import WsyncWorkerExtension

SITE = Path("/tmp/devpack-build/site")
SERVICE = Path(va.__file__).resolve().parents[3]


# ---- import hygiene -----------------------------------------------------------------------------
def test_package_import_does_not_import_vllm(tmp_path):
    """A poisoned `vllm` package on sys.path: importing every module of the package (and the actors
    that use it) must not touch it; only a probe does, and a broken install reads as "none"."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise RuntimeError('vllm was imported')\n")
    code = textwrap.dedent("""
        import sys
        import wsync.engines.vllm as v
        import wsync.engines.vllm.worker, wsync.engines.vllm.direct, wsync.engines.vllm.engine
        import wsync.actors.trainer, wsync.actors.engine
        assert not [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]
        api = v.detect_generation()  # probing does import vllm: the broken install reads as "none"
        assert api.generation == "none" and "vllm was imported" in api.notes[0], api
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": f"{tmp_path}:{SERVICE}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_only_the_package_names_vllm_modules():
    """No module under service/ outside wsync/engines/vllm/ imports vllm or names a vllm module."""
    pkg = SERVICE / "wsync" / "engines" / "vllm"
    pattern = re.compile(r"^\s*(import vllm\b|from vllm\b)|[\"']vllm\.[a-z_]", re.M)  # imports, dotted module names
    offenders = [str(f.relative_to(SERVICE)) for f in SERVICE.rglob("*.py")
                 if pkg not in f.parents and pattern.search(f.read_text())]
    assert offenders == []
    assert pattern.search((pkg / "detect.py").read_text())  # the pattern does find the package's own probe
    assert va.EXTENSION_QUALNAME == f"{WsyncWorkerExtension.__module__}.{WsyncWorkerExtension.__qualname__}"


def test_in_process_sys_modules_clean():
    assert "vllm" not in sys.modules
    assert not [m for m in sys.modules if m.startswith("vllm.")]


# ---- detection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("gen,version,expect", [
    ("A", "0.24.0", "A"), ("B", "0.25.0", "B"), ("B27", "0.27.1", "B"), ("C", "0.28.0", "C"),
    ("C_with_loader", "0.28.9", "C"), ("D", "0.33.0", "D"),
])
def test_detect_generation_fake_trees(gen, version, expect):
    api = api_of(gen, version)
    assert (api.generation, api.version) == (expect, version) and api.installed


@pytest.mark.parametrize("gen,version", [("old", "0.22.1"), ("bare", "0.10.1")])
def test_vllm_before_0_23_reads_as_not_installed(gen, version):
    api = api_of(gen, version)
    assert (api.generation, api.version, api.installed) == ("none", version, False)
    assert "0.23" in api.notes[0]
    with pytest.raises(va.VLLMUnsupportedError, match=r"vLLM >= 0\.23.*0\.22\.1|vLLM >= 0\.23.*0\.10\.1"):
        va.receive_plan(api)


def test_detect_flags_per_generation():
    a, b, c, d = (api_of(g) for g in "ABCD")
    assert a.sparse_backend == "nccl" and a.start_takes_checkpoint_format and a.native_dense
    assert a.static_trainer_api and a.packed_in_update_info and not a.stateful_trainer
    for x in (b, c, d):
        assert x.sparse_backend == "sparse_nccl" and not x.start_takes_checkpoint_format and not x.native_dense
    assert b.static_trainer_api and not b.stateful_trainer
    assert c.stateful_trainer and d.stateful_trainer and not c.checkpoint_coords and d.checkpoint_coords


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
        if (isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                and "KW_ONLY" not in ast.unparse(n.annotation)):
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
    for info in (vp.dense_update_info(metas, False, api), vp.dense_update_info(metas, True, api,
                 packed_buffer_size_bytes=1 << 20, packed_num_buffers=3), vp.sparse_update_info(metas, api)):
        assert set(info) <= set(upd) and required <= set(info), (info, upd)
    assert set(vp.init_info("h", 1, 2)) == set(class_fields(va.M_NCCL, "NCCLWeightTransferInitInfo"))
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
    ours = {a for a in dir(WsyncWorkerExtension) if not a.startswith("__")}
    theirs = set(worker) | set(class_methods("vllm.v1.worker.worker_base", "WorkerBase"))
    assert ours and not ours & theirs
    assert "distributed_executor_backend" in class_fields("vllm.config.parallel", "ParallelConfig")


# ---- receive plans ------------------------------------------------------------------------------
def test_receive_plan_per_generation():
    assert va.receive_plan(api_of("A", "0.24.0")) == {"dense": "native", "sparse": "native"}
    for gen in "BCD":  # a 'sparse_nccl' engine takes no dense round: dense goes through the extension
        assert va.receive_plan(api_of(gen)) == {"dense": "extension", "sparse": "native"}
    assert va.receive_plan(api_of("A"), extension_only=True) == {"dense": "extension", "sparse": "extension"}
    with pytest.raises(va.VLLMUnsupportedError, match="not installed"):
        va.receive_plan(api_of("none"))


def test_packed_dense_needs_vllms_own_dense_receive():
    a, d = api_of("A", "0.24.0"), api_of("D", "0.30.0")
    va.check_packed(a, va.receive_plan(a))
    for api, plan in ((d, va.receive_plan(d)), (a, va.receive_plan(a, extension_only=True))):
        with pytest.raises(va.VLLMUnsupportedError, match=f"vLLM {api.version}.*packed"):
            va.check_packed(api, plan)


# ---- payload builders ---------------------------------------------------------------------------
METAS = [{"name": "model.embed_tokens.weight", "dtype": "bfloat16", "shape": [10, 4]},
         {"name": "model.norm.weight", "dtype": "torch.float32", "shape": [4]}]


def test_dense_update_info_gen_a_is_reference_dict():
    info = vp.dense_update_info(METAS, False, api_of("A"))
    assert info == {"names": ["model.embed_tokens.weight", "model.norm.weight"],
                    "dtype_names": ["bfloat16", "float32"], "shapes": [[10, 4], [4]], "packed": False}
    packed = vp.dense_update_info(METAS, True, api_of("A"), packed_buffer_size_bytes=64)
    assert packed["packed"] is True and packed["packed_buffer_size_bytes"] == 64
    assert "packed" not in vp.dense_update_info(METAS, False, api_of("D"))
    assert vp.dense_update_info(METAS) == {k: info[k] for k in ("names", "dtype_names", "shapes")}  # extension
    with pytest.raises(va.VLLMUnsupportedError):
        vp.dense_update_info(METAS, True, api_of("D"))


def test_sparse_update_info_shapes_per_generation():
    metas = [{"name": "model.embed_tokens.weight", "dtype": "bfloat16", "shape": [10, 4], "count": 8}]
    a = vp.sparse_update_info(metas, api_of("A"))
    assert a == {"names": ["model.embed_tokens.weight"], "dtype_names": ["bfloat16"], "shapes": [[10, 4]],
                 "num_updates_list": [8], "update_kind": "sparse_flat"}
    for info in [vp.sparse_update_info(metas, api_of(gen)) for gen in "BCD"] + [vp.sparse_update_info(metas)]:
        assert list(info) == ["names", "dtype_names", "shapes", "num_updates_list"]
    # from patch objects: dtype from values, count from indices, shape from `shapes`
    patch = types.SimpleNamespace(name="w", indices=torch.arange(3, dtype=torch.int32),
                                  values=torch.zeros(3, dtype=torch.bfloat16))
    info = vp.sparse_update_info([patch], api_of("D"), shapes={"w": (5, 2)})
    assert info == {"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[5, 2]], "num_updates_list": [3]}
    with pytest.raises(ValueError, match="shape"):
        vp.sparse_update_info([patch], api_of("D"))


def test_init_info():
    assert vp.init_info("10.0.0.1", "29500", 3, rank_offset=2) == {
        "master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 2, "world_size": 3}
    assert vp.init_info("h", 1, 2)["rank_offset"] == 1
    assert vp.init_info("h", 1, 2, packed=True)["packed"] is True


def test_payload_bytes():
    assert vp.dense_payload_bytes(METAS) == 10 * 4 * 2 + 4 * 4
    params = [torch.zeros(10, 4, dtype=torch.bfloat16), torch.zeros(4)]
    assert vp.dense_payload_bytes(METAS) == sum(p.numel() * p.element_size() for p in params)
    sparse = [{"name": "a", "dtype": "bfloat16", "shape": [9], "count": 5},
              {"name": "b", "dtype": "float32", "shape": [9], "count": 2}]
    assert vp.sparse_payload_bytes(sparse) == 5 * 4 + 5 * 2 + 2 * 4 + 2 * 4
    patch = types.SimpleNamespace(name="w", indices=torch.arange(7, dtype=torch.int32),
                                  values=torch.ones(7, dtype=torch.float16))
    assert vp.sparse_payload_bytes([patch]) == 7 * 4 + 7 * 2 == patch.indices.nbytes + patch.values.nbytes
    assert vp.itemsize("float8_e4m3fn") == 1 and vp.itemsize(torch.float64) == 8
    assert math.prod([]) == 1 and vp.dense_payload_bytes([{"name": "s", "dtype": "float32", "shape": []}]) == 4


def test_engine_kwargs():
    def factory(backend):
        return {"backend": backend}

    kw = vp.engine_kwargs(api_of("A"), 0.6, True, max_model_len=512, config_factory=factory)
    assert kw == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.6, "enforce_eager": True,
                  "dtype": "bfloat16", "distributed_executor_backend": "uni", "max_model_len": 512,
                  "worker_extension_cls": va.EXTENSION_QUALNAME, "weight_transfer_config": {"backend": "nccl"}}
    for gen in "BCD":
        kwargs = vp.engine_kwargs(api_of(gen), config_factory=factory)
        assert kwargs["weight_transfer_config"] == {"backend": "sparse_nccl"}
    with pytest.raises(va.VLLMUnsupportedError):
        vp.engine_kwargs(api_of("none"), config_factory=factory)
