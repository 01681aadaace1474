"""The flat IPC sparse format ("ipc_flat"): a colocated sparse sync in a handful of kernels, whatever the
number of tensors. No planning, no encoding: on one GPU wire size does not matter, kernel count does.

Metas (plain data, one per patch, `FlatMeta.to_list()` = [name, dtype, shape, count]) come in "flat
order": grouped by dtype (dtype groups in order of first appearance, metas order kept within a group;
`flat_metas` builds it). Byte layout of one sync in the staging buffer (`flat_layout`), offsets 16-byte
aligned, padding unspecified:
  [0, 4 * N)            int32 local (row-major, per-tensor) indices of ALL patches, flat order
                        (N = sum of counts);
  then per dtype group  its values concatenated, flat order (count * itemsize bytes), at an aligned offset.
Every offset follows from the metas on the host: no size or offset travels in the buffer.

Host syncs: trainer 0 (`write_flat`: counts are `indices.numel()`, one `torch.cat(out=...)` for the
indices and one per dtype for the values); its `mark_ready()` is the transport's ordering sync. Engine 1
(`apply_flat`: the range check's single `.item()`; nothing is written when an index is out of range).

Engine side: `flat_ranges(targets)` gives each target (a contiguous tensor, e.g. a runtime slice view)
its (storage, element offset, numel); `apply_flat` computes global = local + repeat_interleave(offsets,
counts) on the device and writes with ONE `index_copy_` per (storage, dtype) run of consecutive metas. When
all targets of a dtype share one storage (`flat.flatten_by_dtype`, or `flat.flatten_params` buckets),
that is one scatter per dtype (per bucket). Work is chunked every `chunk` indices to bound the int64
temporaries (8 + 4 bytes per index per chunk); ops per sync = O(chunks + runs), never O(tensors).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from .encodings.common import SparsePatch, device_ints, kernel_budget
from .meta import dtype_name, torch_dtype

__all__ = ["FLAT_IPC", "FlatLayout", "FlatMeta", "FlatRanges", "FlatStaged", "apply_flat", "flat_layout",
           "flat_metas", "flat_ranges", "read_flat", "write_flat"]
FLAT_IPC = "ipc_flat"
ALIGN = 16


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class FlatMeta:
    name: str
    dtype: str
    shape: tuple[int, ...]
    count: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def to_list(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.count]

    @classmethod
    def of(cls, v) -> FlatMeta:
        """From a list [name, dtype, shape, count], a dict with those keys, or a FlatMeta."""
        if isinstance(v, FlatMeta):
            return v
        name, dtype, shape, count = (v["name"], v["dtype"], v["shape"], v["count"]) if isinstance(v, Mapping) else v
        out = cls(str(name), dtype_name(torch_dtype(str(dtype))), tuple(int(s) for s in shape), int(count))
        if out.count < 0 or out.count > out.numel:
            raise ValueError(f"{out.name}: count {out.count} for a tensor of {out.numel} elements")
        return out


def flat_metas(patches: Sequence[SparsePatch], shapes: Mapping[str, Sequence[int]] | None = None) -> list[FlatMeta]:
    """The patches' metas in flat order (host only, no device access beyond numel/dtype). `shapes`: each
    tensor's shape (default: the values' shape is unknown, so it is required)."""
    out: dict[str, list[FlatMeta]] = {}
    for p in patches:
        shape = tuple(shapes[p.name]) if shapes is not None else None
        if shape is None:
            raise ValueError(f"{p.name}: tensor shape needed for its flat meta")
        if p.indices.numel() != p.values.numel():
            raise ValueError(f"{p.name}: {p.indices.numel()} indices, {p.values.numel()} values")
        d = dtype_name(p.values.dtype)
        out.setdefault(d, []).append(FlatMeta(p.name, d, shape, int(p.indices.numel())))
    return [m for group in out.values() for m in group]


@dataclass(frozen=True)
class FlatLayout:
    total: int  # bytes of the sync
    count: int  # N, all indices
    starts: tuple[int, ...]  # per meta: first position in the index section (prefix sums, N at the end)
    values: dict[str, tuple[int, int, int]]  # dtype -> (byte offset, first meta, first index position)


def flat_layout(metas: Sequence[FlatMeta]) -> FlatLayout:
    """Offsets of one sync (module docstring); raises ValueError when the metas are not in flat order or
    name a tensor twice."""
    starts = tuple(accumulate((m.count for m in metas), initial=0))
    values: dict[str, tuple[int, int, int]] = {}
    off, last, seen = _up(4 * starts[-1]), None, set()
    for i, m in enumerate(metas):
        if m.name in seen:
            raise ValueError(f"{m.name}: appears twice in the flat metas")
        seen.add(m.name)
        if m.dtype != last:
            if m.dtype in values:
                raise ValueError(f"{m.name}: flat metas must be grouped by dtype ({m.dtype} appears twice)")
            end = starts[i]
            values[m.dtype] = (off, i, end)
            last = m.dtype
        off += m.count * torch_dtype(m.dtype).itemsize
        if i + 1 == len(metas) or metas[i + 1].dtype != m.dtype:
            off = _up(off)
    return FlatLayout(off if metas else 0, starts[-1], starts, values)


def _group_counts(metas: Sequence[FlatMeta], lay: FlatLayout, dtype: str) -> int:
    first = lay.values[dtype][1]
    n = 0
    for m in metas[first:]:
        if m.dtype != dtype:
            break
        n += m.count
    return n


def _flat1(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 1 else t.reshape(-1)


def write_flat(buf: torch.Tensor, metas: Sequence[FlatMeta], patches: Sequence[SparsePatch]) -> int:
    """Write one sync into `buf` (uint8, on the patches' device; 16-byte aligned start): one cat for the
    indices, one per dtype for the values, no host sync. `patches` in any order (matched by name); returns
    the bytes used."""
    lay = flat_layout(metas)
    if lay.total > buf.numel():
        raise ValueError(f"staging buffer of {buf.numel()} bytes, this sync needs {lay.total}")
    by_name = {p.name: p for p in patches}
    ordered = []
    for m in metas:
        p = by_name.get(m.name)
        if p is None or p.indices.numel() != m.count or p.values.numel() != m.count \
                or dtype_name(p.values.dtype) != m.dtype:
            raise ValueError(f"{m.name}: patch does not match its flat meta {m.to_list()}")
        ordered.append(p)
    live = [p for p in ordered if p.count]
    if not live:
        return lay.total
    with torch.no_grad():
        idx = [p.indices if p.indices.dtype == torch.int32 else p.indices.to(torch.int32) for p in live]
        torch.cat([_flat1(i) for i in idx], out=buf[:4 * lay.count].view(torch.int32))
        for d, (off, _, _) in lay.values.items():
            vals = [_flat1(p.values) for p in live if dtype_name(p.values.dtype) == d]
            if vals:
                n = _group_counts(metas, lay, d)
                dt = torch_dtype(d)
                torch.cat(vals, out=buf[off:off + n * dt.itemsize].view(dt))
    return lay.total


@dataclass
class FlatStaged:
    """One staged sync as views of the buffer: indices [N] int32, values per dtype."""

    metas: list[FlatMeta]
    layout: FlatLayout
    indices: torch.Tensor
    values: dict[str, torch.Tensor]


def read_flat(buf: torch.Tensor, metas: Sequence) -> FlatStaged:
    """Views of one staged sync (alias `buf`; no kernel, no sync)."""
    metas = [FlatMeta.of(m) for m in metas]
    lay = flat_layout(metas)
    if lay.total > buf.numel():
        raise ValueError(f"the flat metas describe {lay.total} staged bytes, the mapped buffer has {buf.numel()}")
    values = {}
    for d, (off, _, _) in lay.values.items():
        dt = torch_dtype(d)
        values[d] = buf[off:off + _group_counts(metas, lay, d) * dt.itemsize].view(dt)
    return FlatStaged(metas, lay, buf[:4 * lay.count].view(torch.int32), values)


@dataclass
class FlatRanges:
    """Each target's place for `apply_flat`: name -> (run key, element offset in that run's view, numel);
    views[key] = a 1-D tensor of the target dtype over the whole storage. Names in `skip` are checked but
    never written (e.g. a tied lm_head the engine drops)."""

    where: dict[str, tuple[int, int, int]]
    views: list[torch.Tensor]
    dtypes: dict[str, str]
    skip: frozenset[str] = frozenset()


def flat_ranges(targets: Mapping[str, torch.Tensor], skip: Sequence[str] = ()) -> FlatRanges:
    """Host-only plan of the targets' storages (rebuild it whenever a target's storage changes). Raises
    ValueError for a non-contiguous target or one not aligned to its dtype in its storage."""
    keys: dict[tuple[int, torch.dtype], int] = {}
    views: list[torch.Tensor] = []
    where, dtypes = {}, {}
    for name, t in targets.items():
        t = t.detach()
        if not t.is_contiguous():
            raise ValueError(f"{name}: target is not contiguous")
        st, size = t.untyped_storage(), t.element_size()
        byte_off = t.data_ptr() - st.data_ptr()
        if byte_off % size:
            raise ValueError(f"{name}: target not aligned to its dtype in its storage")
        k = (st.data_ptr(), t.dtype)
        if k not in keys:
            keys[k] = len(views)
            views.append(torch.empty(0, dtype=t.dtype, device=t.device).set_(st, 0, (st.nbytes() // size,), (1,)))
        where[name] = (keys[k], byte_off // size, t.numel())
        dtypes[name] = dtype_name(t.dtype)
    return FlatRanges(where, views, dtypes, frozenset(skip))


def _check_metas(ranges: FlatRanges, metas: Sequence[FlatMeta]) -> list[tuple[int, int, int]]:
    out = []
    for m in metas:
        w = ranges.where.get(m.name)
        if w is None or ranges.dtypes[m.name] != m.dtype or w[2] != m.numel:
            raise ValueError(f"{m.name}: not a target of {m.dtype} with {m.numel} elements")
        out.append(w)
    return out


def apply_flat(ranges: FlatRanges, staged: FlatStaged, chunk: int | None = None) -> dict:
    """Check every index (0 <= i < numel; one host sync; nothing written when one fails: ValueError),
    then write every value into its target (module docstring). Not synchronized. Returns counts."""
    metas, lay = staged.metas, staged.layout
    where = _check_metas(ranges, metas)
    n = lay.count
    if n == 0:
        return {"elements": 0, "scatters": 0, "chunks": 0}
    dev = staged.indices.device
    chunk = int(chunk or kernel_budget(dev))
    starts = lay.starts
    cuts = list(range(0, n, chunk)) + [n]
    # host: per chunk, the metas it overlaps and their clipped counts; one upload for all of it
    plan: list = []
    counts: list[int] = []
    offs: list[int] = []
    nums: list[int] = []
    for a, b in zip(cuts, cuts[1:]):
        i0 = bisect.bisect_right(starts, a) - 1
        i1 = bisect.bisect_left(starts, b)
        ids = [i for i in range(i0, min(i1, len(metas))) if metas[i].count]
        plan.append((a, b, ids, len(counts)))
        for i in ids:
            counts.append(min(b, starts[i + 1]) - max(a, starts[i]))
            offs.append(where[i][1])
            nums.append(where[i][2])
    d_counts, d_offs, d_nums = device_ints(dev, counts, offs, nums)
    with torch.no_grad():
        bad = torch.zeros((), dtype=torch.bool, device=dev)
        for a, b, ids, c0 in plan:
            c = slice(c0, c0 + len(ids))
            lim = torch.repeat_interleave(d_nums[c], d_counts[c], output_size=b - a)
            loc = staged.indices[a:b]
            bad |= ((loc < 0) | (loc >= lim)).any()
        if bool(bad.item()):  # the one host sync
            raise ValueError("sparse index out of range; nothing was applied")
        scatters = 0
        for a, b, ids, c0 in plan:
            c = slice(c0, c0 + len(ids))
            glob = torch.repeat_interleave(d_offs[c], d_counts[c], output_size=b - a)
            glob += staged.indices[a:b]
            scatters += _scatter_runs(ranges, staged, where, ids, a, b, glob)
    return {"elements": n, "scatters": scatters, "chunks": len(plan)}


def _scatter_runs(ranges: FlatRanges, staged: FlatStaged, where, ids: list[int], a: int, b: int,
                  glob: torch.Tensor) -> int:
    """One index_copy_ per run of consecutive metas (within [a, b)) that share a target view."""
    metas, lay, done = staged.metas, staged.layout, 0
    k = 0
    while k < len(ids):
        key, dtype = where[ids[k]][0], metas[ids[k]].dtype
        j = k
        while j + 1 < len(ids) and where[ids[j + 1]][0] == key and metas[ids[j + 1]].dtype == dtype:
            j += 1
        lo, hi = max(a, lay.starts[ids[k]]), min(b, lay.starts[ids[j] + 1])
        names = {metas[i].name for i in ids[k:j + 1]}
        if not names & ranges.skip:
            first = lay.values[dtype][2]
            vals = staged.values[dtype][lo - first:hi - first]
            ranges.views[key].index_copy_(0, glob[lo - a:hi - a], vals)
            done += 1
        elif not names <= ranges.skip:  # a run mixing skipped and written targets: write the rest apart
            for i in ids[k:j + 1]:
                if metas[i].name in ranges.skip:
                    continue
                s, e = max(a, lay.starts[i]), min(b, lay.starts[i + 1])
                first = lay.values[dtype][2]
                ranges.views[key].index_copy_(0, glob[s - a:e - a], staged.values[dtype][s - first:e - first])
                done += 1
        k = j + 1
    return done
