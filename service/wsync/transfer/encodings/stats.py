"""Batched index statistics of sparse patches (for planning and for encoding without re-sorting).

Sortedness, uniqueness, range, widest gap, gap8 escape bytes and whole-row checks of many index
tensors come from one pass over all of them concatenated (per-segment reductions over fixed-size
blocks) and ONE host sync; a second only when some tensor is not ascending, for one segmented sort
of those. Results are cached per indices tensor (keyed by the tensor object and its version
counter, so an in-place change invalidates them): `encode` after `plan_sparse` of the same patches
needs neither a sort nor a host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..meta import INT32_MAX
from .common import (
    ESC,
    cat_parts,
    chunk_ids,
    device_ints,
    flat_index,
    kernel_budget,
    repeat_per_segment,
    seg_starts,
)

BLOCK = 128  # block length of the batched statistics pass (each segment padded to whole blocks)


@dataclass
class IndexStats:
    """One index tensor's statistics (host values, from the batched pass)."""

    ascending: bool  # strictly ascending and >= 0 as given: sorted order is the given order
    ok: bool  # sorted indices unique and >= 0
    first: int  # smallest index
    last: int  # largest index
    max_gap: int  # widest gap of the sorted indices (gap0 = first index)
    escapes: int | None  # gap8 escape bytes (None: not computed)
    rows: dict[int, bool] = field(default_factory=dict)  # cols -> exactly whole rows of a [*, cols] tensor
    order: tuple[torch.Tensor, torch.Tensor] | None = None  # (ascending indices, permutation) unless ascending

    def has(self, cols: int, escapes: bool) -> bool:
        return (cols == 0 or cols in self.rows) and (not escapes or self.escapes is not None)

    def rows_ok(self, cols: int) -> bool:
        return cols > 0 and self.ok and self.rows.get(cols, False)


# ---- cache --------------------------------------------------------------------------------------
try:
    from torch.utils.weak import WeakIdKeyDictionary

    _CACHE: Any = WeakIdKeyDictionary()
except ImportError:  # pragma: no cover - older torch
    _CACHE = None


def _cached(idx: torch.Tensor) -> IndexStats | None:
    if _CACHE is None:
        return None
    try:
        version = idx._version
    except RuntimeError:  # inference tensors keep no version counter: never cached
        return None
    hit = _CACHE.get(idx)
    return hit[1] if hit is not None and hit[0] == version else None


def _remember(idx: torch.Tensor, st: IndexStats) -> None:
    if _CACHE is None:
        return
    try:
        version = idx._version
    except RuntimeError:
        return
    _CACHE[idx] = (version, st)


# ---- the batched pass ---------------------------------------------------------------------------
def _block_ranges(starts: Sequence[int], lens: Sequence[int], stride: Sequence[int] | None = None) -> torch.Tensor:
    """Host int64: for each segment, starts[i] + stride[i] * arange(lens[i]), concatenated."""
    total = sum(lens)
    if not total:
        return torch.empty(0, dtype=torch.int64)
    ln = torch.tensor(lens, dtype=torch.int64)
    seg = torch.repeat_interleave(torch.arange(len(lens)), ln, output_size=total)
    local = torch.arange(total) - torch.tensor(seg_starts(lens)[:-1], dtype=torch.int64)[seg]
    if stride is not None:
        local = local * torch.tensor(stride, dtype=torch.int64)[seg]
    return torch.tensor(starts, dtype=torch.int64)[seg] + local


def _seg_stats(xs_list: Sequence[torch.Tensor], cols: Sequence[int], escapes: bool) -> list[list[int]]:
    """Per segment (non-empty 1-D int32/int64 index tensors on one device), in the GIVEN order:
    [min index, max index, min gap, max gap, bad rows (cols > 1), gap8 escapes, first index]; ONE
    host sync for all (they go through the kernels in batches of about `kernel_budget` indices)."""
    if not xs_list:
        return []
    counts = [int(x.numel()) for x in xs_list]
    parts = [_seg_stats_dev([xs_list[i] for i in ids], [cols[i] for i in ids], escapes)
             for ids in chunk_ids(counts, kernel_budget(xs_list[0].device))]
    return cat_parts(parts).tolist()


def _host_layout(counts: Sequence[int], cols: Sequence[int]) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """Host side of `_seg_stats_dev`: padded sizes, padded starts, and (as host int64 tensors) the
    padding positions, each block's segment, and the whole-row checks' first elements, row lengths
    and segments."""
    n = len(counts)
    padded = [-(-c // BLOCK) * BLOCK for c in counts]
    starts = seg_starts(padded)
    pad_pos = _block_ranges([s + c for s, c in zip(starts, counts)], [p - c for p, c in zip(padded, counts)])
    rseg = [i for i in range(n) if cols[i] > 1]
    nrows_host = [counts[i] // cols[i] for i in rseg]
    nrows = torch.tensor(nrows_host, dtype=torch.int64)
    rstarts = _block_ranges([starts[i] for i in rseg], nrows_host, [cols[i] for i in rseg])
    rcols = torch.repeat_interleave(torch.tensor([cols[i] for i in rseg], dtype=torch.int64), nrows,
                                    output_size=rstarts.numel()) if rseg else rstarts
    rlocal = torch.repeat_interleave(torch.tensor(rseg, dtype=torch.int64), nrows,
                                     output_size=rstarts.numel()) if rseg else rstarts
    bseg = torch.repeat_interleave(torch.arange(n), torch.tensor([p // BLOCK for p in padded], dtype=torch.int64),
                                   output_size=sum(padded) // BLOCK)
    return padded, starts, [pad_pos, bseg, rstarts, rcols, rlocal]


def _seg_stats_dev(xs_list: Sequence[torch.Tensor], cols: Sequence[int], escapes: bool) -> torch.Tensor:
    """`_seg_stats` of one batch as an int64 [segments, 7] tensor on the device (no host sync).
    (The zero padding enters min/max index: exact whenever the min index is >= 0 or < 0.)

    The segments are concatenated, each padded with zeros to whole blocks of BLOCK; gaps are taken
    across the whole buffer and fixed at segment starts (gap0 = first index) and in the padding (0),
    so per-block min/max reduce to per-segment values over a few blocks. A gap is computed in the
    indices' dtype: with int32 indices it can wrap only when some index is negative, and then the
    min index says the segment is invalid anyway."""
    dev = xs_list[0].device
    n = len(xs_list)
    counts = [int(x.numel()) for x in xs_list]
    padded, starts, host = _host_layout(counts, cols)
    pieces: list[torch.Tensor] = []
    pad = None
    for x, c, size in zip(xs_list, counts, padded):
        pieces.append(x)
        if size > c:
            if pad is None:
                pad = torch.zeros(BLOCK, dtype=torch.int32, device=dev)
            pieces.append(pad[: size - c])
    xs = cat_parts(pieces)
    firsts, pad_d, bseg_d, rstarts_d, rcols_d, rseg_d = device_ints(dev, starts[:-1], *host)

    g = torch.empty_like(xs)
    torch.sub(xs[1:], xs[:-1], out=g[1:])
    g[1:].sub_(1)
    heads = xs.index_select(0, firsts)
    g.index_copy_(0, firsts, heads)
    if pad_d.numel():
        g.index_fill_(0, pad_d, 0)

    def per_segment(vals: torch.Tensor, how: str) -> torch.Tensor:
        out = torch.empty(n, dtype=vals.dtype, device=dev)
        return out.scatter_reduce_(0, bseg_d, vals, how, include_self=False).long()

    gb, xb = g.view(-1, BLOCK), xs.view(-1, BLOCK)  # (amin and amax apart: aminmax over a dim is slow on CPU)
    cols_out = [per_segment(xb.amin(1), "amin"), per_segment(xb.amax(1), "amax"),
                per_segment(gb.amin(1), "amin"), per_segment(gb.amax(1), "amax")]
    bad = torch.zeros(n, dtype=torch.int64, device=dev)
    if rseg_d.numel():
        a = xs.index_select(0, rstarts_d).long()
        b = xs.index_select(0, rstarts_d + rcols_d - 1).long()
        wrong = (torch.remainder(a, rcols_d) != 0) | (b - a != rcols_d - 1)
        bad.index_add_(0, rseg_d, wrong.long())
    cols_out.append(bad)
    if escapes:
        k = torch.div(g, ESC, rounding_mode="floor")
        ksum = k.view(-1, BLOCK).sum(1, dtype=k.dtype).long()
        cols_out.append(torch.zeros(n, dtype=torch.int64, device=dev).index_add_(0, bseg_d, ksum))
    else:
        cols_out.append(torch.full((n,), -1, dtype=torch.int64, device=dev))
    cols_out.append(heads.long())
    return torch.stack(cols_out, 1)


def _segmented_sort(xs_list: Sequence[torch.Tensor], maxes: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ascending indices, permutation) of each segment: ONE sort of (segment, index) keys when the
    indices are in [0, INT32_MAX], else one sort per segment."""
    if not all(0 <= m <= INT32_MAX for m in maxes) or len(xs_list) == 1:
        out = []
        for x in xs_list:
            s, perm = torch.sort(x)
            out.append((s, perm))
        return out
    counts = [int(x.numel()) for x in xs_list]
    dev, total = xs_list[0].device, sum(counts)
    starts = seg_starts(counts)
    (segs,) = device_ints(dev, [i << 31 for i in range(len(counts))])
    key_base = repeat_per_segment(segs, counts, total)
    keys = torch.cat(list(xs_list)).long() + key_base
    keys, perm = torch.sort(keys)
    keys.sub_(key_base)  # segments keep their place: the base at each position is unchanged
    sorted_x = keys.to(xs_list[0].dtype) if all(x.dtype == torch.int32 for x in xs_list) else keys
    (offs,) = device_ints(dev, starts[:-1])
    perm.sub_(repeat_per_segment(offs, counts, total))
    return [(sorted_x[a:a + c], perm[a:a + c]) for a, c in zip(starts, counts)]


def compute_stats(xs_list: list[torch.Tensor], cols: list[int], escapes: bool) -> list[IndexStats]:
    """Stats of non-empty 1-D index tensors on one device (uncached): one host sync, two if some
    are not ascending. `cols[i]` > 0 also checks whole rows of that length; `escapes` also counts
    gap8 escape bytes."""
    raw = _seg_stats(xs_list, cols, escapes)
    out: list[IndexStats | None] = [None] * len(xs_list)
    resort = []
    for i, (xmin, xmax, gmin, gmax, bad, esc, head) in enumerate(raw):
        if xmin >= 0 and gmin >= 0:
            out[i] = IndexStats(True, True, head, xmax, gmax, esc if escapes else None,
                                {cols[i]: bad == 0} if cols[i] else {})
        elif xmin < 0:  # a negative index: invalid in every encoding that needs the sorted order
            out[i] = IndexStats(False, False, xmin, xmax, 0, 0 if escapes else None,
                                {cols[i]: False} if cols[i] else {})
        else:
            resort.append(i)
    if resort:
        orders = _segmented_sort([xs_list[i] for i in resort], [raw[i][1] for i in resort])
        raw2 = _seg_stats([s for s, _ in orders], [cols[i] for i in resort], escapes)
        for i, order, (_, xmax, gmin, gmax, bad, esc, head) in zip(resort, orders, raw2):
            ok = gmin >= 0
            out[i] = IndexStats(False, ok, head, xmax, gmax, esc if escapes else None,
                                {cols[i]: ok and bad == 0} if cols[i] else {}, order)
    return out  # type: ignore[return-value]


def stats_for(indices: Sequence[torch.Tensor], cols: Sequence[int], escapes: bool) -> list[IndexStats]:
    """Stats of each (non-empty) index tensor, from the cache or from one batched pass per device."""
    out: list[IndexStats | None] = [None] * len(indices)
    todo: dict[torch.device, list[int]] = {}
    for i, idx in enumerate(indices):
        st = _cached(idx)
        if st is not None and st.has(cols[i], escapes):
            out[i] = st
        else:
            todo.setdefault(idx.device, []).append(i)
    for ids in todo.values():
        fresh = compute_stats([flat_index(indices[i]) for i in ids], [cols[i] for i in ids], escapes)
        for i, st in zip(ids, fresh):
            old = _cached(indices[i])
            if old is not None:
                st.rows = {**old.rows, **st.rows}
                if st.escapes is None:
                    st.escapes = old.escapes
                if st.order is None and not st.ascending:
                    st.order = old.order
            _remember(indices[i], st)
            out[i] = st
    return out  # type: ignore[return-value]


def sorted_order(idx: torch.Tensor, st: IndexStats) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ascending indices and the permutation that sorts the given order (None: already ascending)."""
    if st.ascending:
        return flat_index(idx), None
    if st.order is None:
        st.order = torch.sort(flat_index(idx))
    return st.order[0], st.order[1]
