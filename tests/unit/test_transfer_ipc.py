"""CUDA-IPC transfer: the pure parts on CPU (layout, digest, plain-data round trip, UUID mapping,
refusal of a foreign GPU, copy plans, remap on a new export, sparse staging). Handles are faked: the
fake opener returns the trainer's own CPU storage for a handle, so the copies really read the trainer's
bytes. The real CUDA path is tests/gpu/test_ipc_one_gpu.py."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from wsync.transfer.encodings import SparsePatch
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.flat import flatten_params
from wsync.transfer.ipc import (
    BufferHandle,
    IpcDeviceError,
    IpcError,
    IpcExport,
    IpcMapping,
    IpcStaleLayoutError,
    LayoutEntry,
    layout_digest,
    layout_of,
    local_index,
    plan_copies,
)
from wsync.transfer.ipc_sparse import (
    StagingMapping,
    in_range,
    read_staging,
    staging_layout,
    write_staging,
)
from wsync.transfer.meta import param_metas
from wsync.transfer.sparse import plan_sparse

GPU0, GPU1 = "GPU-aaaa-0000", "GPU-bbbb-1111"
_ids = itertools.count()


class FakeIpc:
    """Stands in for cudaIpcGetMemHandle / cudaIpcOpenMemHandle within one process."""

    def __init__(self) -> None:
        self.storages: dict[bytes, torch.UntypedStorage] = {}
        self.opened: list[bytes] = []

    def share(self, st: torch.UntypedStorage) -> BufferHandle:
        key = b"h%d" % next(_ids)
        self.storages[key] = st
        return BufferHandle(0, key, st.nbytes(), 0, b"rc", 0, b"\0" * 64, True)

    def export(self, params, uuid: str = GPU0) -> IpcExport:
        storages, layout = layout_of(params)
        return IpcExport(uuid, [self.share(s) for s in storages], [s.nbytes() for s in storages], layout)

    def open(self, h: BufferHandle, device: int) -> torch.UntypedStorage:
        self.opened.append(h.handle)
        return self.storages[h.handle]


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed": [64, 16], "l0.q": [16, 16], "l0.k": [8, 16], "l0.v": [8, 16], "l0.bias": [16],
              "l0.gate": [32, 16], "l0.up": [32, 16], "l0.down": [16, 32], "norm": [16]}
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}


def flat_model(bucket_bytes: int = 4096, seed: int = 0) -> dict[str, torch.Tensor]:
    params = model(seed)
    flatten_params(params, bucket_bytes)
    return params


def test_layout_of_flat_buckets_offsets_and_digest():
    params = flat_model()
    storages, layout = layout_of(params)
    assert [e.name for e in layout] == list(params)
    assert 1 < len(storages) < len(params)  # buckets, not one storage per tensor
    for e in layout:
        raw = torch.empty(0, dtype=torch.uint8).set_(storages[e.bucket], 0, (storages[e.bucket].nbytes(),))
        got = raw[e.offset:e.offset + e.nbytes].view(torch.bfloat16).view(e.shape)
        assert torch.equal(got, params[e.name])
    sizes = [s.nbytes() for s in storages]
    assert layout_digest(layout, sizes) == layout_digest(list(layout), list(sizes))
    params["norm"] = params["norm"].clone()  # re-homed: another storage, another layout
    s2, l2 = layout_of(params)
    assert layout_digest(l2, [s.nbytes() for s in s2]) != layout_digest(layout, sizes)


def test_layout_refuses_non_contiguous_and_mixed_devices():
    with pytest.raises(IpcError, match="not contiguous"):
        layout_of({"w": torch.zeros(4, 4).t()})
    meta = torch.empty(4, device="meta")
    with pytest.raises(IpcError, match="several devices"):
        layout_of({"a": torch.zeros(4), "b": meta})


def test_export_is_plain_data_and_round_trips():
    fake = FakeIpc()
    exp = fake.export(flat_model())
    wire = json.dumps(exp.to_dict(binary="base64"))  # JSON-able: no pickle, no torch objects
    back = IpcExport.from_dict(json.loads(wire))
    assert back == exp and back.export_id == exp.export_id
    raw = exp.to_dict()
    assert all(isinstance(b["handle"], bytes) for b in raw["buffers"])
    assert IpcExport.from_dict(raw) == exp
    raw["layout"][0][2] += 2  # an offset edited in transit
    with pytest.raises(IpcError, match="digest"):
        IpcExport.from_dict(raw)


def test_tampered_handle_refused():
    raw = FakeIpc().export(flat_model()).to_dict()
    raw["buffers"][0]["handle"] = b"another allocation"
    with pytest.raises(IpcError, match="export_id"):
        IpcExport.from_dict(raw)
    raw["export_id"] = ""  # no id given: recomputed from the content
    assert IpcExport.from_dict(raw).export_id


def test_new_handles_same_layout_new_export_id():
    fake, params = FakeIpc(), flat_model()
    a, b = fake.export(params), fake.export(params)
    assert a.digest == b.digest and a.export_id != b.export_id


def test_local_index_maps_by_uuid_and_refuses_foreign_gpu():
    assert local_index(GPU0, [GPU1, GPU0]) == 1  # other CUDA_VISIBLE_DEVICES order
    with pytest.raises(IpcDeviceError, match="does not see"):
        local_index("GPU-cccc", [GPU0, GPU1])
    with pytest.raises(IpcDeviceError, match="same GPU"):
        local_index(GPU0, [GPU0, GPU1], want=1)


def test_mapping_refuses_handle_from_another_gpu():
    fake = FakeIpc()
    m = IpcMapping(opener=fake.open, uuids=[GPU1])
    with pytest.raises(IpcDeviceError):
        m.ensure(fake.export(flat_model(), uuid=GPU0))
    assert fake.opened == [] and m.export is None


def _targets(params) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(t) for n, t in params.items()}


def test_dense_copy_from_mapped_buffers_into_separate_targets():
    fake, params = FakeIpc(), flat_model()
    m = IpcMapping(opener=fake.open, uuids=[GPU0])
    exp = fake.export(params)
    assert m.ensure(exp) is True and m.ensure(exp.to_dict()) is False  # opened once
    assert len(fake.opened) == len(exp.buffers)
    targets = _targets(params)
    plan = m.plan(targets, key="t")
    m.copy(exp.export_id, plan)
    assert fingerprint(targets) == fingerprint(params)
    assert plan.tensors == len(params) and plan.copies == len(params)  # separate targets: no merge
    for t in params.values():  # the trainer steps in place; the next sync reuses the plan
        t.add_(1)
    m.copy(exp.export_id, m.plan(targets, key="t"))
    assert fingerprint(targets) == fingerprint(params)
    assert len(fake.opened) == len(exp.buffers)


def test_identical_flat_layout_is_one_copy_per_bucket_and_fused_slices_merge():
    fake, params = FakeIpc(), flat_model(bucket_bytes=1 << 20)
    exp = fake.export(params)
    engine = _targets(params)
    flatten_params(engine, 1 << 20)
    m = IpcMapping(opener=fake.open, uuids=[GPU0])
    m.ensure(exp)
    plan = m.plan(engine)
    assert plan.copies == len(exp.buffers) == 1
    m.copy(exp.export_id, plan)
    assert fingerprint(engine) == fingerprint(params)
    # vLLM-style fused targets: gate/up are rows of one gate_up tensor, adjacent in the trainer too
    fused = torch.zeros(64, 16, dtype=torch.bfloat16)
    targets = {**_targets(params), "l0.gate": fused[:32], "l0.up": fused[32:]}
    plan = plan_copies(exp.layout, m.buffers, targets)
    assert plan.copies == len(params) - 1
    plan.run()
    assert torch.equal(fused, torch.cat([params["l0.gate"], params["l0.up"]]))


def test_plan_refuses_missing_or_mismatched_targets():
    fake, params = FakeIpc(), flat_model()
    m = IpcMapping(opener=fake.open, uuids=[GPU0])
    m.ensure(fake.export(params))
    targets = _targets(params)
    del targets["norm"]
    with pytest.raises(IpcError, match="no target"):
        m.plan(targets)
    assert m.plan(targets, key="skip", skip=["norm"]).tensors == len(params) - 1
    bad = {**_targets(params), "l0.q": torch.zeros(16, 8, dtype=torch.bfloat16)}
    with pytest.raises(IpcError, match="does not match"):
        plan_copies(m.export.layout, m.buffers, bad)


def test_remap_on_new_export_and_stale_sync_refused():
    fake, params = FakeIpc(), flat_model()
    m = IpcMapping(opener=fake.open, uuids=[GPU0])
    old = fake.export(params)
    m.ensure(old)
    targets = _targets(params)
    old_plan = m.plan(targets)
    flatten_params(params, 1 << 20)  # the trainer re-lays out: new buffers, new offsets
    new = fake.export(params)
    assert new.digest != old.digest
    with pytest.raises(IpcStaleLayoutError):
        m.copy(new.export_id, old_plan)  # never copies with the old offsets
    assert fingerprint(targets) == fingerprint(_targets(params))  # nothing written
    assert m.ensure(new) is True
    with pytest.raises(IpcStaleLayoutError):
        m.check(old.export_id)
    m.copy(new.export_id, m.plan(targets))
    assert fingerprint(targets) == fingerprint(params)
    m.close()
    assert m.buffers == [] and m.export is None


def _patches(params, density: float, seed: int) -> list[SparsePatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, t in params.items():
        flat = t.view(-1)
        idx = (torch.rand(flat.numel(), generator=g) < density).nonzero().view(-1)
        vals = (flat[idx].float() + 1).to(t.dtype)
        flat[idx] = vals
        out.append(SparsePatch(name, idx.to(torch.int32), vals))
    return out


@pytest.mark.parametrize("encoding", ["auto", "flat_int32", "gap"])
def test_staging_round_trip_and_apply(encoding):
    from wsync.transfer.apply import apply_patches

    params = flat_model()
    engine = {n: t.clone() for n, t in params.items()}
    specs = {m.name: m for m in param_metas(params.items())}
    patches = _patches(params, 0.05, seed=3)
    metas = plan_sparse(patches, specs, encoding, params)
    lay = staging_layout(metas)
    buf = torch.full((lay.total + 64,), 0xAB, dtype=torch.uint8)
    assert write_staging(buf, metas, patches, params) == lay.total
    got = read_staging(buf, metas)
    assert [p.name for p in got] == [m.name for m in metas]
    assert in_range(got, [params[p.name].numel() for p in got])
    apply_patches(engine, [p for p in got if p.count])
    assert fingerprint(engine) == fingerprint(params)
    assert lay.total > 8
    with pytest.raises(IpcError, match="needs"):
        write_staging(buf[:lay.total - 8], metas, patches, params)


def test_in_range_catches_out_of_range_and_negative():
    p = SparsePatch("w", torch.tensor([0, 3], dtype=torch.int32), torch.zeros(2))
    assert in_range([p], [4]) and not in_range([p], [3])
    neg = SparsePatch("w", torch.tensor([-(2**31), 1], dtype=torch.int32), torch.zeros(2))
    assert not in_range([neg], [4])


def test_staging_mapping_opens_once_and_refuses_other_id():
    fake = FakeIpc()
    buf = torch.zeros(4096, dtype=torch.uint8)
    h = fake.share(buf.untyped_storage())
    export = {"uuid": GPU0, "size": 4096, "buffer": h.to_dict("base64"), "staging_id": "s-1"}
    sm = StagingMapping(opener=fake.open, uuids=[GPU0])
    assert sm.ensure(export) is True and sm.ensure(export) is False
    assert sm.buf.data_ptr() == buf.data_ptr()
    with pytest.raises(IpcStaleLayoutError):
        sm.patches("s-2", [])
    with pytest.raises(IpcDeviceError):
        StagingMapping(opener=fake.open, uuids=[GPU1]).ensure(export)


def test_layout_entry_round_trip():
    e = LayoutEntry("w", 1, 16, 6, "bfloat16", (2, 3))
    assert LayoutEntry.from_list(json.loads(json.dumps(e.to_list()))) == e and e.nbytes == 12
