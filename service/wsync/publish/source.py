"""Where published weights come from: a plain ``nn.Module`` / HF model, a name -> tensor mapping, or
an FSDP2 (``torch.distributed.fsdp.fully_shard``) model whose parameters are DTensors.

`WeightSource.chunks(bucket_bytes)` yields ``[(checkpoint name, full tensor)]`` lists in the dense
wire's order. An unsharded source yields ONE chunk of views of the live tensors (no copy; the dense
sender keeps its pipelining and zero-copy buckets). A sharded source yields one chunk per bucket of
`transfer.dense.plan_buckets`, each DTensor gathered with ``full_tensor()`` just before its chunk is
yielded and released after, so the extra memory is about one bucket, never the whole model.

Collectives: every rank of the sharded model must iterate the same chunks (``full_tensor`` is an
all-gather); only the publishing rank (rank 0 of the default process group, `is_publishing_rank`)
sends what it gathered. Under torchrun with DDP (replicated weights) only rank 0 needs a source at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from wsync.transfer.dense import plan_buckets
from wsync.transfer.meta import TensorMeta, param_metas

from .names import NameHook, NameMap, check_layout

__all__ = ["WeightSource", "is_dtensor", "is_publishing_rank", "world_rank"]

Chunk = list[tuple[str, torch.Tensor]]


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def world_rank() -> int:
    """This process's rank in the default process group (0 when there is none)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_publishing_rank() -> bool:
    """Rank 0 of the default group (or no group at all) is the one that sends."""
    return world_rank() == 0


class WeightSource:
    """A model's tensors under the engines' checkpoint names, gathered bucket by bucket when sharded."""

    def __init__(self, model: torch.nn.Module | Mapping[str, torch.Tensor], name_map: NameHook | None = None,
                 engine_metas: Sequence[TensorMeta] | None = None) -> None:
        named = list(model.named_parameters() if isinstance(model, torch.nn.Module) else model.items())
        self._user = dict(named)
        self.names = NameMap(name_map)
        self._map: dict[str, str] = {}
        self.bind(engine_metas)

    def bind(self, engine_metas: Sequence[TensorMeta] | None) -> None:
        """Map names (using the engines' names when given) and, with ``engine_metas``, refuse a layout
        mismatch (`LayoutError`) before any byte moves."""
        engine_names = [m.name for m in engine_metas] if engine_metas is not None else None
        self._map = self.names.resolve(self._user, engine_names)
        if engine_metas is not None:
            check_layout(self.metas(), engine_metas)

    @property
    def sharded(self) -> bool:
        return any(is_dtensor(self._user[u]) for u in self._map)

    @property
    def device(self) -> torch.device:
        for u in self._map:
            t = self._user[u]
            return t.to_local().device if is_dtensor(t) else t.device
        return torch.device("cpu")

    def names_map(self) -> dict[str, str]:
        """{user name: checkpoint name}."""
        return dict(self._map)

    def metas(self) -> list[TensorMeta]:
        """Checkpoint names with global dtypes and shapes (a DTensor's full shape), in wire order."""
        return param_metas((ck, self._user[u]) for u, ck in self._map.items())

    def local(self) -> dict[str, torch.Tensor]:
        """{checkpoint name: live tensor (detached view)}; only for an unsharded source."""
        if self.sharded:
            raise ValueError("a sharded source has no local full tensors; iterate chunks() on every rank")
        return {ck: self._user[u].detach() for u, ck in self._map.items()}

    def chunks(self, bucket_bytes: int) -> Iterator[Chunk]:
        """Full tensors in wire order: one chunk (unsharded) or one gathered bucket at a time (sharded).
        Every rank of a sharded model must consume the whole iterator."""
        if not self.sharded:
            yield list(self.local().items())
            return
        pairs = [(ck, self._user[u]) for u, ck in self._map.items()]
        for bucket in plan_buckets(param_metas(pairs), bucket_bytes):
            with torch.no_grad():
                chunk = [(pairs[i][0], _full(pairs[i][1])) for i in bucket]
            yield chunk
            del chunk


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if is_dtensor(t) else t
