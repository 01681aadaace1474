"""Shared by the publish tests: a real gloo group of a publisher (rank 0) and receivers in threads."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from wsync.transfer import Rendezvous, free_port, open_group
from wsync.transfer.group import SyncGroup


def run_group(world: int, fns: list[Callable[[SyncGroup], object]], timeout_s: float = 60) -> list[object]:
    """Open one gloo group of ``world`` ranks, rank r in its own thread running ``fns[r](group)``;
    returns their results (re-raises the first error)."""
    rdv = Rendezvous("127.0.0.1", free_port(), world, "gloo", "pubtest")
    results: list[object] = [None] * world
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            group = open_group(rdv, rank, torch.device("cpu"), timeout_s=timeout_s)
            try:
                results[rank] = fns[rank](group)
            finally:
                group.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 30)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results
