"""Batched sparse encode: many (patch, meta) at once -> each patch's uint8 wire pieces.

Values go first (in ascending index order for the sorted encodings), then the index bytes. The
index tails of all patches that share an encoding (and device, and gap width) are built by a
handful of kernels over their concatenated sorted indices, not per tensor. Validation against the
meta uses the index statistics of encodings.stats (cached by `plan_sparse`, so no sort and no host sync
for patches just planned; otherwise one host sync per device).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..meta import INT32_MAX, TensorMeta, bytes_view
from .common import (
    BITMASK,
    DENSE,
    ESC,
    FLAT,
    GAP,
    GAP8,
    GAP_DTYPES,
    ROWS,
    SparseMeta,
    SparsePatch,
    cat_parts,
    check_numel,
    chunk_ids,
    device_ints,
    kernel_budget,
    repeat_per_segment,
    rows_cols,
    seg_starts,
)
from .stats import IndexStats, sorted_order, stats_for

Item = tuple[SparsePatch, SparseMeta, "torch.Tensor | None"]


# ---- index tails of ascending index tensors, batched ----------------------------------------------
def _gaps(xs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """gap0 = first index, gapk = ik - ik-1 - 1, per segment of `counts` in the concatenated `xs`."""
    g = torch.empty_like(xs)
    if xs.numel() > 1:
        torch.sub(xs[1:], xs[:-1], out=g[1:])
        g[1:].sub_(1)
    firsts = [s for s, c in zip(seg_starts(counts), counts) if c]
    if len(firsts) == 1:
        g[firsts[0]:firsts[0] + 1].copy_(xs[firsts[0]:firsts[0] + 1])
    elif firsts:
        (pos,) = device_ints(xs.device, firsts)
        g.index_copy_(0, pos, xs.index_select(0, pos))
    return g


def _tails_escaped(s_list: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
    """gap8 gap bytes of each ascending index tensor (`sizes`: its known byte count)."""
    counts = [int(s.numel()) for s in s_list]
    xs = cat_parts(s_list)
    g = _gaps(xs, counts)
    k = torch.div(g, ESC, rounding_mode="floor")
    last = torch.sub(g, k, alpha=ESC).to(torch.uint8)  # g % 255
    total = sum(sizes)
    k.add_(1)
    ends = torch.cumsum(k, 0, dtype=torch.int32 if total < INT32_MAX else torch.int64)
    ends.sub_(1)  # where each element's final byte goes
    out = torch.full((total,), ESC, dtype=torch.uint8, device=xs.device)
    out.index_put_((ends,), last)
    return [out[a:b] for a, b in zip(seg_starts(sizes)[:-1], seg_starts(sizes)[1:])]


def _tails_gaps(s_list: Sequence[torch.Tensor], width: int) -> list[torch.Tensor]:
    """gap bytes (`width` bytes each) of each ascending index tensor."""
    counts = [int(s.numel()) for s in s_list]
    g = _gaps(cat_parts(s_list), counts)
    if width == 2:
        g = torch.where(g >= 2**15, g - 2**16, g)
    raw = bytes_view(g.to(GAP_DTYPES[width]))
    return [raw[a * width:(a + c) * width] for a, c in zip(seg_starts(counts), counts)]


def _tails_bits(s_list: Sequence[torch.Tensor], numels: Sequence[int]) -> list[torch.Tensor]:
    """bitmask bytes of each index tensor (indices known to be in [0, numel))."""
    nbytes = [(n + 7) // 8 for n in numels]
    out: list[torch.Tensor] = []
    for ids in chunk_ids([nb * 8 for nb in nbytes], kernel_budget(s_list[0].device, bits=True)):
        counts = [int(s_list[i].numel()) for i in ids]
        nb = [nbytes[i] for i in ids]
        dev, total_bits, n = s_list[ids[0]].device, sum(nb) * 8, sum(counts)
        small = total_bits < INT32_MAX
        (bases,) = device_ints(dev, [b * 8 for b in seg_starts(nb)[:-1]])
        pos = cat_parts([s_list[i] for i in ids]).to(torch.int32 if small else torch.int64)
        pos = pos + repeat_per_segment(bases.to(pos.dtype), counts, n)
        bits = torch.zeros(total_bits, dtype=torch.uint8, device=dev)
        bits.index_put_((pos,), torch.ones((), dtype=torch.uint8, device=dev))
        shifts = torch.arange(8, dtype=torch.uint8, device=dev)
        packed = (bits.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)
        out += [packed[a:a + c] for a, c in zip(seg_starts(nb), nb)]
    return out


# ---- host-side checks -----------------------------------------------------------------------------
def _dense_full(patch: SparsePatch, spec: TensorMeta, full: torch.Tensor | None) -> torch.Tensor:
    if full is None:
        raise ValueError(f"{spec.name}: dense encoding of a partial patch needs the full tensor")
    if list(full.shape) != spec.shape or full.dtype != spec.torch_dtype:
        raise ValueError(f"{spec.name}: full tensor does not match {spec.dtype}{spec.shape}")
    return bytes_view(full.detach().contiguous())


def _check_sorted(meta: SparseMeta, st: IndexStats, nvals: int) -> int:
    """Validate a sorted-order encoding against the index stats (host only); its tail bytes."""
    c, numel = meta.count, meta.spec.numel
    vbytes = nvals * meta.spec.itemsize
    if meta.encoding == GAP:
        width = (meta.nbytes - c * meta.spec.itemsize) // c
        if not st.ok or st.max_gap >= 2 ** (8 * max(width, 0)):
            raise ValueError(f"gaps do not fit {width} byte(s) (indices unsorted/duplicate?)")
        if width not in GAP_DTYPES:
            raise ValueError(f"{meta.name}: {meta.nbytes - c * meta.spec.itemsize} gap bytes for {c} indices")
        tail = c * width
    elif meta.encoding == GAP8:
        if not st.ok:
            raise ValueError("gap8 gaps need sorted unique indices")
        tail = c + int(st.escapes or 0)
    elif meta.encoding == BITMASK:
        if st.first < 0 or st.last >= numel:
            raise ValueError(f"{meta.name}: indices must be in [0, {numel})")
        tail = (numel + 7) // 8
    elif meta.encoding == ROWS:
        cols = rows_cols(meta.shape, c)
        if not st.rows_ok(cols):
            raise ValueError(f"{meta.name}: rows encoding needs whole rows of a 2-D tensor")
        tail = (c // cols) * 4
    else:  # DENSE of a full patch: values only
        tail = 0
    if vbytes + tail != meta.nbytes:
        raise ValueError(f"{meta.name}: encoded {vbytes + tail} bytes, meta says {meta.nbytes}")
    return tail


def _host_pieces(items: Sequence[Item], out: list[list[torch.Tensor] | None]) -> tuple[list[int], ValueError | None]:
    """Fill `out` for the items that need no index statistics (empty, flat, dense of a partial
    patch); the positions of the others (which need the sorted order), and the first host error
    (items after it are left alone, as a per-item loop would)."""
    sorted_ids: list[int] = []
    for i, (patch, meta, full) in enumerate(items):
        try:
            check_numel(meta.spec)
            if patch.values.dtype != meta.spec.torch_dtype:
                raise ValueError(f"{meta.name}: values are {patch.values.dtype}, meta says {meta.dtype}")
            if meta.encoding == DENSE:
                if patch.count == meta.spec.numel:
                    if patch.count == 0:
                        out[i] = []
                    else:
                        sorted_ids.append(i)
                else:
                    out[i] = [_dense_full(patch, meta.spec, full)]
            elif patch.count != meta.count:
                raise ValueError(f"{meta.name}: patch has {patch.count} elements, meta says {meta.count}")
            elif meta.count == 0:
                out[i] = [torch.empty(0, dtype=torch.uint8, device=patch.values.device)]
            elif meta.encoding == FLAT:
                idx_b = bytes_view(patch.indices.to(torch.int32).contiguous())
                out[i] = [idx_b, bytes_view(patch.values.contiguous()).to(idx_b.device)]
            else:
                sorted_ids.append(i)
            done = out[i]
            if done is not None:
                got = sum(p.numel() for p in done)
                if got != meta.nbytes:
                    raise ValueError(f"{meta.name}: encoded {got} bytes, meta says {meta.nbytes}")
        except ValueError as exc:
            return sorted_ids, exc
    return sorted_ids, None


def _tail_batches(items: Sequence[Item], ids_by_key: dict[tuple, list[int]],
                  order: dict[int, torch.Tensor]) -> list[tuple[tuple, list[int]]]:
    """Kernel batches: gap and gap8 groups cut to the device's budget of indices."""
    batches: list[tuple[tuple, list[int]]] = []
    for key, ids in ids_by_key.items():
        if key[0] in (GAP8, GAP):
            budget = kernel_budget(order[ids[0]].device)
            batches += [(key, [ids[j] for j in part]) for part in chunk_ids([items[i][1].count for i in ids], budget)]
        else:
            batches.append((key, ids))
    return batches


def encode_pieces(items: Sequence[Item]) -> list[list[torch.Tensor]]:
    """`encode` of many (patch, meta, full) at once: per item the uint8 pieces whose concatenation is
    its encoding (values bytes, then index bytes). No host sync when the patches' indices were
    planned by `plan_sparse` (their stats are cached), else one per device. Errors as `encode`,
    raised for the first failing item."""
    out: list[list[torch.Tensor] | None] = [None] * len(items)
    sorted_ids, host_error = _host_pieces(items, out)
    cols = [rows_cols(items[i][1].shape, items[i][1].count) if items[i][1].encoding == ROWS else 0
            for i in sorted_ids]
    escapes = any(items[i][1].encoding == GAP8 for i in sorted_ids)
    stats = stats_for([items[i][0].indices for i in sorted_ids], cols, escapes)
    tails: dict[int, int] = {}
    for i, st in zip(sorted_ids, stats):
        tails[i] = _check_sorted(items[i][1], st, int(items[i][0].values.numel()))
    if host_error is not None:
        raise host_error

    groups: dict[tuple, list[int]] = {}
    order: dict[int, torch.Tensor] = {}
    for i, st in zip(sorted_ids, stats):
        patch, meta, _ = items[i]
        s, perm = sorted_order(patch.indices, st)
        vals = patch.values if perm is None else patch.values.index_select(0, perm.to(patch.values.device))
        out[i] = [bytes_view(vals.contiguous())]
        order[i] = s
        enc = meta.encoding
        if enc == GAP:
            key: tuple = (enc, s.device, tails[i] // meta.count)
        elif enc in (GAP8, BITMASK):
            key = (enc, s.device)
        else:  # ROWS, DENSE: per tensor
            key = (enc, i)
        groups.setdefault(key, []).append(i)
    for key, ids in _tail_batches(items, groups, order):
        enc = key[0]
        if enc == GAP8:
            pieces = _tails_escaped([order[i] for i in ids], [tails[i] for i in ids])
        elif enc == GAP:
            pieces = _tails_gaps([order[i] for i in ids], key[2])
        elif enc == BITMASK:
            pieces = _tails_bits([order[i] for i in ids], [items[i][1].spec.numel for i in ids])
        elif enc == ROWS:
            cols_ = items[ids[0]][1].shape[1]
            pieces = [bytes_view(torch.div(order[ids[0]][::cols_], cols_, rounding_mode="floor").to(torch.int32))]
        else:
            continue
        for i, piece in zip(ids, pieces):
            have = out[i]
            assert have is not None  # every sorted item got its values bytes above
            have.append(piece.to(have[0].device))
    return [p if p is not None else [] for p in out]
