"""Flat parameter layout: dense syncs straight from and into parameter storage, wire unchanged."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from wsync.transfer import Rendezvous, TensorMeta, fingerprint, free_port, open_group, param_metas
from wsync.transfer.dense import recv_dense, send_dense
from wsync.transfer.flat import flatten_params

from .test_transfer_group import MODEL, bcast_json, make_model

BUCKET = 4096


def params_of(seed: int) -> dict[str, torch.nn.Parameter]:
    model = make_model(seed, False, torch.device("cpu"))
    return {n: torch.nn.Parameter(t, requires_grad=False) for n, t in model.items()}


def test_flatten_keeps_values_and_ties():
    params = params_of(1)
    lm = torch.nn.Linear(48, 256, bias=False)
    lm.weight = params["embed"]  # tied, as lm_head and embed_tokens are
    before = fingerprint(params)
    assert flatten_params(params, BUCKET) >= 1
    assert fingerprint(params) == before
    assert lm.weight is params["embed"]
    # Buckets now sit back to back in one storage each.
    norm, scalar = params["norm"], params["scalar"]
    assert norm.untyped_storage().data_ptr() == scalar.untyped_storage().data_ptr()
    assert scalar.data_ptr() == norm.data_ptr() + norm.numel() * norm.element_size()


def test_misaligned_bucket_is_left_alone():
    params = {"a": torch.zeros(3, dtype=torch.bfloat16), "b": torch.zeros(2, dtype=torch.float32)}
    assert flatten_params(params, 1 << 20) == 0  # b would start at byte 6: not float32-aligned


def _worker(rank: int, port: int, flat_sender: bool, flat_receiver: bool) -> None:
    group = open_group(Rendezvous("127.0.0.1", port, 2, "gloo"), rank, torch.device("cpu"), timeout_s=60)
    params = params_of(1 if rank == 0 else 2)
    if (rank == 0 and flat_sender) or (rank == 1 and flat_receiver):
        flatten_params(params, BUCKET)
    if rank == 0:
        bcast_json(group, [m.to_dict() for m in param_metas(params.items())])
        stats = send_dense(group, list(params.items()), BUCKET)
        flat = flat_sender
    else:
        metas = [TensorMeta.from_dict(d) for d in bcast_json(group)]
        stats = recv_dense(group, metas, BUCKET, params)
        flat = flat_receiver
    assert (stats.zero_copy == stats.messages) == flat, (rank, stats)
    assert bcast_json(group, fingerprint(params) if rank == 0 else None) == fingerprint(params)
    group.close()


def test_dense_sync_zero_copy_on_either_side():
    assert len(MODEL) > 2
    for flat_sender, flat_receiver in [(True, True), (True, False), (False, True)]:
        mp.spawn(_worker, args=(free_port(), flat_sender, flat_receiver), nprocs=2, join=True)
