"""The vLLM worker side of the CUDA-IPC route (engines/vllm/ipc.py) on CPU: the REAL mixin methods over
the fake vLLM worker (vLLM's Qwen2 runtime layout: fused qkv / gate_up), handles faked so the worker's
copies read the trainer's own CPU buffers. Checked against the trainer by exact fingerprints."""

from __future__ import annotations

import pytest
import torch
from bench.shapes import (
    fused_tensors,
    get_shape,
    hf_metas,
    make_weights,
    runtime_layout,
)

from wsync.engines.vllm.detect import EXTENSION_QUALNAME as IPC_EXTENSION_QUALNAME
from wsync.engines.vllm.worker import WsyncWorkerExtension as WsyncIpcWorkerExtension
from wsync.transfer.encodings import SparsePatch
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.flat import flatten_params
from wsync.transfer.ipc import IpcMapping, IpcStaleLayoutError
from wsync.transfer.ipc_sparse import StagingMapping, staging_layout, write_staging
from wsync.transfer.meta import param_metas
from wsync.transfer.sparse import plan_sparse

from .test_transfer_ipc import GPU0, FakeIpc

try:
    from tests.fakes.fake_vllm import FakeWorker  # after the fakes move
except ImportError:
    from bench.fake_vllm import FakeWorker


class Worker(FakeWorker):  # FakeWorker carries WsyncWorkerExtension, IpcReceiveMixin included
    pass


@pytest.fixture
def setup():
    shape = get_shape("tiny")
    metas = hf_metas(shape)
    weights = make_weights(metas, torch.device("cpu"), seed=5)
    flatten_params(weights, 1 << 20)
    worker, fake = Worker(shape), FakeIpc()
    worker._wsync_ipc = {"mapping": IpcMapping(opener=fake.open, uuids=[GPU0]),
                         "staging": StagingMapping(opener=fake.open, uuids=[GPU0]), "map_token": None}
    layout = runtime_layout(metas, shape.tied)
    return worker, fake, weights, lambda: fingerprint(list(fused_tensors(weights, layout)))


def test_extension_qualname_resolves():
    mod, _, cls = IPC_EXTENSION_QUALNAME.rpartition(".")
    assert getattr(__import__(mod, fromlist=[cls]), cls) is WsyncIpcWorkerExtension


def test_map_then_dense_syncs_into_fused_runtime_params(setup):
    worker, fake, weights, expected = setup
    exp = fake.export(weights)
    got = worker.wsync_ipc_map(exp.to_dict())
    assert got["remapped"] and got["map_rebuilt"] and got["tensors"] == len(weights)
    assert got["copies"] < got["tensors"]  # gate/up (adjacent on both sides) merge
    assert worker.wsync_fingerprint() != expected()
    worker.wsync_ipc_dense(exp.export_id)
    assert worker.wsync_fingerprint() == expected()
    for t in weights.values():
        t.mul_(-1)
    again = worker.wsync_ipc_map(exp.to_dict())  # same export: nothing reopened or rebuilt
    assert not again["remapped"] and not again["map_rebuilt"]
    worker.wsync_ipc_dense(exp.export_id)
    assert worker.wsync_fingerprint() == expected()
    assert len(fake.opened) == len(exp.buffers)


def test_stale_export_refused_before_any_copy(setup):
    worker, fake, weights, expected = setup
    old = fake.export(weights)
    worker.wsync_ipc_map(old.to_dict())
    flatten_params(weights, 1 << 12)  # the trainer re-laid out its buffers
    new = fake.export(weights)
    before = worker.wsync_fingerprint()
    with pytest.raises(IpcStaleLayoutError):
        worker.wsync_ipc_dense(new.export_id)
    assert worker.wsync_fingerprint() == before
    assert worker.wsync_ipc_map(new.to_dict())["remapped"]
    worker.wsync_ipc_dense(new.export_id)
    assert worker.wsync_fingerprint() == expected()


def test_replaced_runtime_param_rebuilds_map_and_plan(setup):
    worker, fake, weights, expected = setup
    exp = fake.export(weights)
    worker.wsync_ipc_map(exp.to_dict())
    model = worker.model_runner.model
    old = model.model.layers[0].mlp.gate_up_proj.weight
    model.model.layers[0].mlp.gate_up_proj.weight = torch.nn.Parameter(torch.zeros_like(old), requires_grad=False)
    worker.wsync_ipc_dense(exp.export_id)
    assert worker.wsync_fingerprint() == expected()


def _stage(fake, weights, density, seed):
    g = torch.Generator().manual_seed(seed)
    patches = []
    for name, t in weights.items():
        flat = t.view(-1)
        idx = (torch.rand(flat.numel(), generator=g) < density).nonzero().view(-1)
        flat[idx] = (flat[idx].float() + 0.5).to(t.dtype)
        patches.append(SparsePatch(name, idx.to(torch.int32), flat[idx].clone()))
    specs = {m.name: m for m in param_metas(weights.items())}
    metas = plan_sparse(patches, specs, "auto", weights)
    buf = torch.zeros(staging_layout(metas).total + 8, dtype=torch.uint8)
    write_staging(buf, metas, patches, weights)
    h = fake.share(buf.untyped_storage())
    export = {"uuid": GPU0, "size": buf.numel(), "buffer": h.to_dict(), "staging_id": f"s{seed}"}
    return export, [m.to_dict() for m in metas], buf


def test_sparse_from_staging_and_bad_index_leaves_model_untouched(setup):
    worker, fake, weights, expected = setup
    exp = fake.export(weights)
    worker.wsync_ipc_map(exp.to_dict())
    worker.wsync_ipc_dense(exp.export_id)
    export, metas, _ = _stage(fake, weights, 0.01, seed=1)
    assert worker.wsync_ipc_map_staging(export)["remapped"]
    with pytest.raises(IpcStaleLayoutError):
        worker.wsync_ipc_sparse("other", metas)
    got = worker.wsync_ipc_sparse(export["staging_id"], metas)
    assert got["elements"] > 0
    assert worker.wsync_fingerprint() == expected()
    # an index past the end: refused before anything is written
    name = "model.norm.weight"
    bad = [{"name": name, "dtype": "bfloat16", "shape": list(weights[name].shape), "count": 1,
            "encoding": "flat_int32", "nbytes": 6}]
    stage = worker._wsync_ipc["staging"].buf
    stage[:4].view(torch.int32).fill_(weights[name].numel())
    before = worker.wsync_fingerprint()
    with pytest.raises(ValueError, match="out of range"):
        worker.wsync_ipc_sparse(export["staging_id"], bad)
    assert worker.wsync_fingerprint() == before


def test_unmap_drops_everything(setup):
    worker, fake, weights, _ = setup
    exp = fake.export(weights)
    worker.wsync_ipc_map(exp.to_dict())
    out = worker.wsync_ipc_unmap()
    assert out["export_id"] is None and worker._wsync_ipc is None


def _stage_flat(fake, weights, density, seed):
    from wsync.transfer.ipc_flat import flat_layout, flat_metas, write_flat

    g = torch.Generator().manual_seed(seed)
    patches = []
    for name, t in weights.items():
        flat = t.view(-1)
        idx = (torch.rand(flat.numel(), generator=g) < density).nonzero().view(-1)
        flat[idx] = (flat[idx].float() + 0.25).to(t.dtype)
        patches.append(SparsePatch(name, idx.to(torch.int32), flat[idx].clone()))
    metas = flat_metas(patches, {n: t.shape for n, t in weights.items()})
    buf = torch.zeros(flat_layout(metas).total + 16, dtype=torch.uint8)
    write_flat(buf, metas, patches)
    h = fake.share(buf.untyped_storage())
    export = {"uuid": GPU0, "size": buf.numel(), "buffer": h.to_dict(), "staging_id": f"f{seed}"}
    return export, [m.to_list() for m in metas]


def test_flatten_then_dense_and_flat_sparse_land_in_live_params(setup):
    worker, fake, weights, expected = setup
    model = worker.model_runner.model
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():  # distinct runtime values, so "values kept" means something
        p.data.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
    before = worker.wsync_fingerprint()
    exp = fake.export(weights)
    got = worker.wsync_ipc_map(exp.to_dict(), 1 << 20, True)
    assert got["flatten"]["flattened"] and not got["flatten"]["already"], got["flatten"]
    assert worker.wsync_fingerprint() == before  # every runtime value kept
    assert len({p.data.untyped_storage().data_ptr() for p in model.parameters()}) == 1  # one dtype: one buffer
    worker.wsync_ipc_dense(exp.export_id)
    assert worker.wsync_fingerprint() == expected()
    for seed in (1, 2):
        export, metas = _stage_flat(fake, weights, 0.02, seed)
        worker.wsync_ipc_map_staging(export)
        out = worker.wsync_ipc_sparse_flat(export["staging_id"], metas)
        assert out["scatters"] == 1 and out["elements"] > 0
        assert worker.wsync_fingerprint() == expected()
    with pytest.raises(IpcStaleLayoutError):
        worker.wsync_ipc_sparse_flat("other", metas)
    # out of range: refused, nothing written
    stage = worker._wsync_ipc["staging"].buf
    stage[:4].view(torch.int32).fill_(-5)
    snap = worker.wsync_fingerprint()
    with pytest.raises(ValueError, match="out of range"):
        worker.wsync_ipc_sparse_flat(export["staging_id"], metas)
    assert worker.wsync_fingerprint() == snap
    # dense again after all that, into the same live parameters
    for t in weights.values():
        t.mul_(-1)
    worker.wsync_ipc_dense(exp.export_id)
    assert worker.wsync_fingerprint() == expected()


def test_flat_sparse_without_flatten_and_refused_flatten(setup):
    worker, fake, weights, expected = setup
    exp = fake.export(weights)
    worker.vllm_config.model_config.enforce_eager = False
    got = worker.wsync_ipc_map(exp.to_dict(), 1 << 20, True)
    assert not got["flatten"]["flattened"] and "enforce_eager" in got["flatten"]["reason"]
    worker.wsync_ipc_dense(exp.export_id)
    export, metas = _stage_flat(fake, weights, 0.05, 7)
    worker.wsync_ipc_map_staging(export)
    out = worker.wsync_ipc_sparse_flat(export["staging_id"], metas)
    assert out["scatters"] > 1  # per runtime parameter, still correct
    assert worker.wsync_fingerprint() == expected()


def test_repointed_params_behind_the_maps_back_rebuild_it(setup):
    worker, fake, weights, expected = setup
    exp = fake.export(weights)
    worker.wsync_ipc_map(exp.to_dict())
    worker.wsync_ipc_flatten()  # no map rebuild asked for by the caller: the data_ptr check catches it
    worker.wsync_ipc_dense(exp.export_id)
    assert worker.wsync_fingerprint() == expected()


def test_service_trainer_flat_sparse_into_flattened_worker(setup, monkeypatch):
    """The service's cuda_ipc sparse path end to end on CPU: the REAL trainer side
    (actors/trainer_ipc.ipc_sparse_write) writes the flat format and the worker applies exactly what it
    sent with wsync_ipc_sparse_flat (the vLLM engine's call for an IPC_FLAT update): one scatter per
    dtype into the flattened runtime parameters, equal to the trainer."""
    from wsync.engines.contract import IPC_FLAT
    from wsync.transfer.sparse import payload_bytes

    from .test_ipc_receiver import ipc_trainer
    from .test_transfer_ipc import _patches

    worker, fake, weights, expected = setup
    trainer = ipc_trainer(monkeypatch, fake, weights)
    export = trainer.ipc_open("g", 1, GPU0)
    got = worker.wsync_ipc_map(export, 1 << 20, True)
    assert got["flatten"]["flattened"], got["flatten"]
    worker.wsync_ipc_dense(trainer.ipc_dense_ready("g")[1].export_id)
    assert worker.wsync_fingerprint() == expected()
    for i in range(2):
        patches = trainer.held[f"p{i}"] = _patches(weights, 0.03, seed=20 + i)
        ipc = trainer.ipc_sparse_write("g", f"p{i}", [])[1]
        assert ipc.fmt == IPC_FLAT and trainer.ipc_sent("g").bytes == payload_bytes(patches)
        if ipc.staging is not None:
            worker.wsync_ipc_map_staging(ipc.staging)
        out = worker.wsync_ipc_sparse_flat(ipc.staging_id, ipc.flat)
        assert out["scatters"] == 1 and out["elements"] == sum(p.count for p in patches)
        assert worker.wsync_fingerprint() == expected()
    trainer.close_group("g")
