"""FSDP2 on CPU/gloo: a 2-rank `fully_shard` model published bucket by bucket (every rank gathers with
full_tensor(), only rank 0 sends) to a receiver thread; the bytes equal the unsharded model's, each
gathered chunk is one bucket, and auto after a step sends a sparse patch the receiver applies."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wsync.publish import Publisher, WeightSource
from wsync.transfer import Rendezvous, free_port, open_group
from wsync.transfer.dense import DenseReceiver, plan_buckets
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.sparse import apply_patches, recv_sparse

BUCKET = 1024

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # pragma: no cover
    pytest.skip("this torch has no FSDP2 fully_shard", allow_module_level=True)


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 16), torch.nn.Linear(16, 8))


def _worker(rank: int, port: int, rx_port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        plain = build()
        want = fingerprint({n: p.detach() for n, p in plain.named_parameters()})
        model = build()
        mesh = init_device_mesh("cpu", (2,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        src = WeightSource(model)
        assert src.sharded
        buckets = plan_buckets(src.metas(), BUCKET)
        sizes = [len(c) for c in src.chunks(BUCKET)]
        assert sizes == [len(b) for b in buckets] and len(sizes) > 1  # one gathered bucket at a time

        pub = Publisher(model, bucket_bytes=BUCKET)
        group = engine = None
        rx_out: dict = {}
        box, ready = {}, threading.Event()
        if rank == 0:  # the engine: a receiver thread in rank 0's process, on its own gloo group
            engine = {n: torch.zeros_like(p) for n, p in plain.named_parameters()}

            def receive():
                g = open_group(Rendezvous("127.0.0.1", rx_port, 2, "gloo", "rx"), 1, "cpu", timeout_s=60)
                for _ in range(2):
                    assert ready.wait(60)
                    ready.clear()
                    plan = box["plan"]
                    if plan.mode == "dense":
                        DenseReceiver(plan.dense_metas, plan.bucket_bytes, engine).recv(g)
                    else:
                        apply_patches(engine, recv_sparse(g, plan.sparse_metas))
                    rx_out[plan.version] = (plan.mode, fingerprint(engine))
                g.close()

            th = threading.Thread(target=receive, daemon=True)
            th.start()
            group = open_group(Rendezvous("127.0.0.1", rx_port, 2, "gloo", "rx"), 0, "cpu", timeout_s=60)

        def announce(plan):
            box["plan"] = plan
            ready.set()

        rep = pub.dense(group, version=1, announce=announce)
        with torch.no_grad():  # an "optimizer step" on each rank's own shard: rows of layer 1's weight
            model[1].weight.to_local()[0].add_(1.0)
        rep2 = pub.auto(group, "1", announce=announce)
        if rank == 0:
            th.join(60)
            group.close()
            assert rx_out["1"] == ("dense", want) and rep.fingerprints == want
            assert rep.stats.wire_bytes == sum(m.nbytes for m in src.metas())
            full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                    for n, p in model.named_parameters()}
        else:
            full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        if rank == 0:
            assert rep2.mode == "sparse" and rep2.elements == 2 * 24  # row 0 of each rank's shard of a [16, 24] weight
            assert rx_out["2"] == ("sparse", fingerprint(full)) and rep2.fingerprints == fingerprint(full)
        q.put((rank, "ok"))
    except BaseException as exc:
        q.put((rank, repr(exc)))
        raise
    finally:
        dist.destroy_process_group()


def test_fsdp2_publish_bucket_by_bucket():
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.spawn(_worker, args=(free_port(), free_port(), q), nprocs=2, join=True)
    got = dict(q.get() for _ in range(2))
    assert got == {0: "ok", 1: "ok"}
