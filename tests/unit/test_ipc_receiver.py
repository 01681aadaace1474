"""The reference engine's cuda_ipc receive (engines/ipc_recv.py: IpcReceiver) on CPU with faked handles
(tests/unit/test_transfer_ipc.FakeIpc: the "opened" buffer is the trainer's own storage, so copies really
read the trainer's bytes): map at join, dense copies, remap on a new export and refusal of a stale one
(nothing copied), sparse from the staging buffer, out-of-range refused with nothing applied, close."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_transfer_ipc import GPU0, FakeIpc, _patches, flat_model
from wsync.engines.contract import IpcDense, IpcSparse
from wsync.engines.ipc_recv import IpcReceiver
from wsync.transfer.encodings import SparsePatch
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.ipc import IpcError, IpcMapping, IpcStaleLayoutError
from wsync.transfer.ipc_sparse import StagingMapping, staging_layout, write_staging
from wsync.transfer.meta import param_metas
from wsync.transfer.sparse import plan_sparse


def _receiver(fake: FakeIpc) -> IpcReceiver:
    rx = IpcReceiver(torch.device("cpu"))
    rx.mapping = IpcMapping(opener=fake.open, uuids=[GPU0])
    rx.staging = StagingMapping(opener=fake.open, uuids=[GPU0])
    return rx


def test_dense_remap_stale_refused_sparse_and_close():
    fake = FakeIpc()
    trainer = flat_model(seed=1)
    engine = flat_model(seed=2)  # same layout, other values
    rx = _receiver(fake)
    export = fake.export(trainer)
    rx.join({"name": "g", "world_size": 2, "exports": {"1": export.to_dict("base64")}}, 1)
    nbytes, copies = rx.dense(IpcDense(export.export_id), engine)
    assert fingerprint(engine) == fingerprint(trainer)
    assert nbytes == sum(m.nbytes for m in param_metas(trainer.items())) and copies < len(trainer)
    with torch.no_grad():
        for t in trainer.values():
            t.view(-1)[:2] += 1  # a trainer step: same buffers, new values
    rx.dense(IpcDense(export.export_id), engine)
    assert fingerprint(engine) == fingerprint(trainer)

    moved = flat_model(seed=3)  # a reload: new buffers, a new export
    new = fake.export(moved)
    before = fingerprint(engine)
    with pytest.raises(IpcStaleLayoutError):
        rx.dense(IpcDense(new.export_id), engine)  # not sent along: refused before any copy
    assert fingerprint(engine) == before
    rx.dense(IpcDense(new.export_id, new.to_dict()), engine)
    assert fingerprint(engine) == fingerprint(moved)

    specs = {m.name: m for m in param_metas(moved.items())}
    patches = _patches(moved, 0.05, seed=4)  # applied to the trainer ("moved") as it builds them
    metas = plan_sparse(patches, specs, "auto", moved)
    buf = torch.zeros(staging_layout(metas).total + 64, dtype=torch.uint8)
    write_staging(buf, metas, patches, moved)
    h = fake.share(buf.untyped_storage())
    staging = {"uuid": GPU0, "size": buf.numel(), "buffer": h.to_dict(), "staging_id": "s-1"}
    assert rx.sparse(IpcSparse("s-1", staging), metas, engine) == sum(p.count for p in patches)
    assert fingerprint(engine) == fingerprint(moved)

    name = next(iter(moved))
    bad = [SparsePatch(name, torch.tensor([moved[name].numel()], dtype=torch.int32),
                       torch.zeros(1, dtype=moved[name].dtype))]
    bad_metas = plan_sparse(bad, specs, "flat_int32", None)
    write_staging(buf, bad_metas, bad, None)
    before = fingerprint(engine)
    with pytest.raises(IpcError, match="out of range"):
        rx.sparse(IpcSparse("s-1"), bad_metas, engine)
    assert fingerprint(engine) == before
    with pytest.raises(IpcStaleLayoutError):
        rx.sparse(IpcSparse("s-2"), metas, engine)

    rx.close()
    assert rx.mapping.export is None and rx.staging.buf is None


class _Trainer:
    """The parts of TrainerCore the cuda_ipc mixin uses, on CPU tensors."""

    def __init__(self, params):
        self.device, self.params, self.groups, self.held = torch.device("cpu"), params, {}, {}

    def _require_model(self):
        pass

    def _patch(self, patch_id):
        return self.held[patch_id]

    def _current_params(self, patch_id):
        return self.params

    def close_group(self, name=None):
        self.ipc_close(name)


def ipc_trainer(monkeypatch, fake: FakeIpc, params):
    """A REAL TrainerIpcMixin (actors/trainer_ipc.py) over ``params``, CUDA faked: exports and the staging
    buffer are shared through ``fake`` (their "opened" storage is the trainer's own)."""
    import wsync.actors.trainer_ipc as ti
    import wsync.transfer.ipc as ipc
    import wsync.transfer.ipc_sparse as ips

    class Exporter:
        def __init__(self, params):
            self.params, self._key, self._export = params, None, None

        def current(self):
            key = tuple(t.data_ptr() for t in self.params.values())
            if key != self._key:
                self._key, self._export = key, fake.export(self.params)
            return self._export

        def mark_ready(self):
            pass

        def close(self):
            self.params = {}

    class Staging(ips.IpcStaging):
        def export(self):
            if self._handle is None:
                self._handle = {"uuid": GPU0, "size": self.capacity, "staging_id": f"s-{self.generation}",
                                "buffer": fake.share(self.buf.untyped_storage()).to_dict()}
            return self._handle

    monkeypatch.setattr(ipc, "IpcExporter", Exporter)
    monkeypatch.setattr(ips, "IpcStaging", Staging)
    monkeypatch.setattr(ti, "gpu_uuid_of", lambda device: GPU0)

    class T(ti.TrainerIpcMixin, _Trainer):
        pass

    return T(params)


def test_trainer_sessions_to_receiver_end_to_end_on_cpu(monkeypatch):
    """TrainerIpcMixin (actors/trainer_ipc.py) -> plain data -> IpcReceiver, CUDA faked: the export goes
    once, again only after a reload; the staging export goes once; sparse syncs are written and applied
    in the flat format (ipc_flat) with a truthful payload; a foreign GPU is refused; close drops every
    session."""
    from wsync.engines.contract import IPC_FLAT
    from wsync.transfer.ipc import IpcDeviceError
    from wsync.transfer.ipc_flat import flat_layout, flat_metas
    from wsync.transfer.sparse import payload_bytes

    fake = FakeIpc()
    trainer = ipc_trainer(monkeypatch, fake, flat_model(seed=1))
    engine = flat_model(seed=2)
    rx = _receiver(fake)
    with pytest.raises(IpcDeviceError, match="same physical GPU"):
        trainer.ipc_open("g", 1, "GPU-other")
    rx.join({"exports": {"1": trainer.ipc_open("g", 1, GPU0.lower())}}, 1)
    assert trainer.ipc_sessions("g", 1) == [1]
    ready = trainer.ipc_dense_ready("g")
    assert ready[1].export is None  # mapped at join: only the id travels
    rx.dense(ready[1], engine)
    assert fingerprint(engine) == fingerprint(trainer.params)
    assert trainer.ipc_sent("g").bytes == sum(m.nbytes for m in param_metas(trainer.params.items()))

    trainer.params = flat_model(seed=5)  # a reload: the next dense sync carries the new export
    ready = trainer.ipc_dense_ready("g")
    assert ready[1].export is not None
    rx.dense(ready[1], engine)
    assert fingerprint(engine) == fingerprint(trainer.params)
    assert trainer.ipc_dense_ready("g")[1].export is None

    specs = {m.name: m for m in param_metas(trainer.params.items())}
    shapes = {n: t.shape for n, t in trainer.params.items()}
    for i in range(2):
        patches = trainer.held[f"p{i}"] = _patches(trainer.params, 0.02, seed=10 + i)
        metas = plan_sparse(patches, specs, "auto", trainer.params)
        got = trainer.ipc_sparse_write("g", f"p{i}", metas)
        assert (got[1].staging is not None) == (i == 0)  # the staging buffer is sent once
        assert got[1].fmt == IPC_FLAT  # the flat format, its metas as plain lists
        assert got[1].flat == [m.to_list() for m in flat_metas(patches, shapes)]
        sent = trainer.ipc_sent("g")
        assert sent.bytes == payload_bytes(patches) == sum(p.count * (4 + p.values.element_size()) for p in patches)
        assert sent.wire_bytes == flat_layout(flat_metas(patches, shapes)).total
        assert rx.sparse(got[1], metas, engine) == sum(p.count for p in patches)
        assert fingerprint(engine) == fingerprint(trainer.params)
    trainer.close_group("g")
    assert trainer.groups == {}
    rx.close()


def test_flat_sparse_bad_index_and_per_tensor_fallback(monkeypatch):
    """The reference receive of a flat sync: an index out of range is refused with nothing applied;
    a target that cannot be addressed flat (not contiguous) still gets the sync, per tensor from the
    same staged views."""
    fake = FakeIpc()
    trainer = ipc_trainer(monkeypatch, fake, flat_model(seed=1))
    rx = _receiver(fake)
    rx.join({"exports": {"1": trainer.ipc_open("g", 1, GPU0)}}, 1)
    engine = flat_model(seed=1)  # equal to the trainer
    name = next(n for n, t in engine.items() if t.dim() == 2)
    trainer.held["bad"] = [SparsePatch(name, torch.tensor([0, trainer.params[name].numel()], dtype=torch.int32),
                                       torch.ones(2, dtype=trainer.params[name].dtype))]
    got = trainer.ipc_sparse_write("g", "bad", [])
    before = fingerprint(engine)
    with pytest.raises(IpcError, match="out of range"):
        rx.sparse(got[1], [], engine)
    assert fingerprint(engine) == before

    engine[name] = engine[name].t().contiguous().t()  # same values, not contiguous: flat impossible
    assert not engine[name].is_contiguous()
    patches = trainer.held["p"] = _patches(trainer.params, 0.05, seed=3)
    got = trainer.ipc_sparse_write("g", "p", [])
    assert rx.sparse(got[1], [], engine) == sum(p.count for p in patches)
    assert fingerprint(engine) == fingerprint(trainer.params)
    rx.close()
