"""Batched sparse decode: many (meta, bytes) at once -> SparsePatch each (int32 indices, values
viewing the buffer where aligned).

Tails of the same encoding (and device, and gap width) are decoded by a handful of kernels over
their concatenation. The only host sync is ONE per device at the end: the index-count checks of
gap8 and bitmask (on CUDA, positions come from nonzero_static, sized from the metas, so no sync
there either).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..meta import INT32_MAX, view_as_dtype
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
    seg_starts,
)


def _idx_dtype(bound: int) -> torch.dtype:
    return torch.int32 if bound < INT32_MAX else torch.int64


def _nonzero(mask: torch.Tensor, size: int, fill: int) -> torch.Tensor:
    """Ascending positions of the set elements, exactly `size` of them (cut, or padded with `fill`);
    on a GPU without a host sync (nonzero_static; a backend without it takes nonzero's sync)."""
    if mask.numel() == 0:
        return torch.full((size,), fill, dtype=torch.int64, device=mask.device)
    if mask.device.type != "cpu" and hasattr(torch, "nonzero_static"):
        try:
            return torch.nonzero_static(mask, size=size, fill_value=fill).view(-1)
        except NotImplementedError:  # pragma: no cover - no kernel for this backend (CUDA has one)
            pass
    pos = torch.nonzero(mask).view(-1)
    if pos.numel() >= size:
        return pos[:size]
    return torch.cat([pos, pos.new_full((size - pos.numel(),), fill)])


def _base_per_segment(cs: torch.Tensor, starts: Sequence[int]) -> torch.Tensor:
    """cs[start - 1] for each segment start (0 for a segment at position 0)."""
    (prev,) = device_ints(cs.device, [max(s - 1, 0) for s in starts])
    base = cs.index_select(0, prev)
    if starts and starts[0] == 0:
        base[:1] = 0
    return base


def _untail_escaped(tails: Sequence[torch.Tensor], counts: Sequence[int],
                    numels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """gap8 gap bytes -> concatenated indices (int32) and the count each tail really holds.
    (Each tail holds at least its count of bytes: checked on the host before.)"""
    b = cat_parts(tails)
    total, n = int(b.numel()), sum(counts)
    starts = seg_starts([int(t.numel()) for t in tails])
    dt = _idx_dtype(sum(numels) + total)
    closes = b != ESC
    inc = b.to(dt)
    inc.add_(closes)  # escape bytes add 255, other bytes close an element (gap + 1)
    cs = torch.cumsum(inc, 0, dtype=dt)
    pos = _nonzero(closes, total, total)  # sorted, padded with `total`
    (bounds,) = device_ints(b.device, starts)
    held = torch.searchsorted(pos, bounds.to(pos.dtype))
    held = held[1:] - held[:-1]
    pos = pos[:n].clamp_(max=total - 1)  # (only a corrupt stream holds fewer: it fails the count check)
    idx = cs.index_select(0, pos)
    idx.sub_(repeat_per_segment(_base_per_segment(cs, starts[:-1]), counts, n)).sub_(1)
    return idx.to(torch.int32), held


def _untail_gaps(tails: Sequence[torch.Tensor], counts: Sequence[int], width: int,
                 numels: Sequence[int]) -> torch.Tensor:
    """gap bytes (`width` each) -> concatenated indices (int32)."""
    raw = cat_parts(tails, copy=True)
    dt = _idx_dtype(sum(numels))
    g = view_as_dtype(raw, GAP_DTYPES[width]).to(dt)
    if width == 2:
        g.bitwise_and_(0xFFFF)
    g.add_(1)
    cs = torch.cumsum(g, 0, dtype=dt)
    n = sum(counts)
    cs.sub_(repeat_per_segment(_base_per_segment(cs, seg_starts(counts)[:-1]), counts, n)).sub_(1)
    return cs.to(torch.int32)


def _untail_bits(tails: Sequence[torch.Tensor], counts: Sequence[int],
                 numels: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """bitmask bytes (exactly ceil(numel/8) each: checked on the host before) -> per tail its int32
    indices, and the count each tail really marks."""
    nbytes = [(x + 7) // 8 for x in numels]
    idx_out: list[torch.Tensor] = []
    held_out: list[torch.Tensor] = []
    for ids in chunk_ids([nb * 8 for nb in nbytes], kernel_budget(tails[0].device, bits=True)):
        nb = [nbytes[i] for i in ids]
        cnt = [counts[i] for i in ids]
        dev, n = tails[ids[0]].device, sum(cnt)
        packed = cat_parts([tails[i] for i in ids], copy=True)
        bstarts = seg_starts(nb)
        partial = [(bstarts[j + 1] - 1, (1 << (numels[i] % 8)) - 1) for j, i in enumerate(ids) if numels[i] % 8]
        bits_base, bounds, last_pos, last_mask = device_ints(
            dev, [s * 8 for s in bstarts[:-1]], bstarts, [p for p, _ in partial], [m for _, m in partial])
        if partial:  # bits past numel in a tensor's last byte are not elements
            packed.index_copy_(0, last_pos, packed.index_select(0, last_pos) & last_mask.to(torch.uint8))
        shifts = torch.arange(8, dtype=torch.uint8, device=dev)
        bits = ((packed.unsqueeze(1) >> shifts) & 1).view(-1)
        dt = _idx_dtype(bits.numel())
        per_byte = bits.view(-1, 8).sum(1, dtype=torch.int32)
        cs = torch.cumsum(per_byte, 0, dtype=dt)
        ends = cs.index_select(0, (bounds[1:] - 1))
        held_out.append(torch.diff(ends, prepend=ends.new_zeros(1)).long())
        pos = _nonzero(bits, n, 0).to(dt)
        pos.sub_(repeat_per_segment(bits_base.to(dt), cnt, n))
        pos = pos.to(torch.int32)
        idx_out += [pos[a:a + c] for a, c in zip(seg_starts(cnt), cnt)]
    return idx_out, torch.cat(held_out)


def _decode_indices(meta: SparseMeta, tail: torch.Tensor) -> torch.Tensor:
    """int64 indices from the part after the values (rows and dense; the others are batched)."""
    numel, dev = meta.spec.numel, tail.device
    if meta.encoding == ROWS:
        rows = view_as_dtype(tail, torch.int32).long()
        cols = meta.shape[1]
        return (rows.unsqueeze(1) * cols + torch.arange(cols, device=dev)).reshape(-1)
    return torch.arange(numel, device=dev)  # DENSE


def _host_decode(metas: Sequence[SparseMeta], bufs: Sequence[torch.Tensor], out: list[SparsePatch | None],
                 values: dict[int, torch.Tensor]) -> tuple[dict[tuple, list[int]], ValueError | None]:
    """Host checks of each buffer, in order; decodes what needs no batching (empty, flat, rows,
    dense) into `out`, keeps the values of the rest in `values` and groups them by (encoding,
    device[, gap width]). Stops at the first host error and returns it."""
    groups: dict[tuple, list[int]] = {}
    for i, (meta, buf) in enumerate(zip(metas, bufs)):
        try:
            check_numel(meta.spec)
            if buf.dtype != torch.uint8 or buf.numel() != meta.nbytes:
                raise ValueError(f"{meta.name}: expected {meta.nbytes} uint8 bytes, got {buf.numel()} {buf.dtype}")
            dt, c = meta.spec.torch_dtype, meta.count
            if meta.encoding == DENSE and c != meta.spec.numel:
                raise ValueError(f"{meta.name}: dense meta count {c} != numel {meta.spec.numel}")
            if c == 0:
                out[i] = SparsePatch(meta.name, torch.empty(0, dtype=torch.int32, device=buf.device),
                                     torch.empty(0, dtype=dt, device=buf.device))
                continue
            if meta.encoding == FLAT:
                idx = view_as_dtype(buf[: 4 * c], torch.int32)
                out[i] = SparsePatch(meta.name, idx, view_as_dtype(buf[4 * c:], dt))
                continue
            vals = view_as_dtype(buf[: c * dt.itemsize], dt)
            tail = buf[c * dt.itemsize:]
            if meta.encoding == GAP:
                width = tail.numel() // c
                if width not in GAP_DTYPES or width * c != tail.numel():
                    raise ValueError(f"{meta.name}: {tail.numel()} gap bytes for {c} indices")
                groups.setdefault((GAP, buf.device, width), []).append(i)
            elif meta.encoding == GAP8:
                if tail.numel() < c:  # every index ends in one closing byte
                    raise ValueError(f"{meta.name}: {tail.numel()} gap8 bytes cannot hold {c} indices")
                groups.setdefault((GAP8, buf.device), []).append(i)
            elif meta.encoding == BITMASK:
                if tail.numel() != (meta.spec.numel + 7) // 8:
                    raise ValueError(f"{meta.name}: {tail.numel()} bitmask bytes for {meta.spec.numel} elements")
                groups.setdefault((BITMASK, buf.device), []).append(i)
            else:  # ROWS, DENSE
                out[i] = SparsePatch(meta.name, _decode_indices(meta, tail).to(torch.int32), vals)
            values[i] = vals
        except ValueError as exc:
            return groups, exc
    return groups, None


def _check_counts(metas: Sequence[SparseMeta], checks: Sequence[tuple[list[int], torch.Tensor]]) -> None:
    """The index counts that gap8 / bitmask tails really hold against their metas: ONE host sync
    per device; raises for the first item (in metas order) that differs."""
    held_by_item: dict[int, int] = {}
    by_device: dict[torch.device, list[tuple[list[int], torch.Tensor]]] = {}
    for ids, held in checks:
        by_device.setdefault(held.device, []).append((ids, held))
    for pairs in by_device.values():
        got = torch.cat([h for _, h in pairs]).tolist()
        for i, h in zip([i for ids, _ in pairs for i in ids], got):
            held_by_item[i] = int(h)
    for i in sorted(held_by_item):
        meta, h = metas[i], held_by_item[i]
        if h != meta.count:
            what = "gap8 stream holds {} indices" if meta.encoding == GAP8 else "bitmask marks {} elements"
            raise ValueError(f"{meta.name}: {what.format(h)}, meta says {meta.count}")


def decode_many(metas: Sequence[SparseMeta], bufs: Sequence[torch.Tensor]) -> list[SparsePatch]:
    """`decode` of many buffers at once (each `meta.nbytes` uint8 bytes, any device): batched
    kernels per encoding and ONE host sync per device (the index-count checks of gap8 and bitmask).
    Errors as `decode`, raised for the first failing item."""
    out: list[SparsePatch | None] = [None] * len(metas)
    values: dict[int, torch.Tensor] = {}
    groups, host_error = _host_decode(metas, bufs, out, values)
    checks: list[tuple[list[int], torch.Tensor]] = []
    batches: list[tuple[tuple, list[int]]] = []
    for key, ids in groups.items():
        if key[0] in (GAP8, GAP):
            budget = kernel_budget(key[1])
            batches += [(key, [ids[j] for j in part]) for part in chunk_ids([metas[i].count for i in ids], budget)]
        else:
            batches.append((key, ids))
    for key, ids in batches:
        enc = key[0]
        tails = [bufs[i][metas[i].count * metas[i].spec.itemsize:] for i in ids]
        counts = [metas[i].count for i in ids]
        numels = [metas[i].spec.numel for i in ids]
        if enc == GAP:
            flat = _untail_gaps(tails, counts, key[2], numels)
            idx_list = [flat[a:a + c] for a, c in zip(seg_starts(counts), counts)]
        elif enc == GAP8:
            flat, held = _untail_escaped(tails, counts, numels)
            idx_list = [flat[a:a + c] for a, c in zip(seg_starts(counts), counts)]
            checks.append((ids, held))
        else:
            idx_list, held = _untail_bits(tails, counts, numels)
            checks.append((ids, held))
        for i, idx in zip(ids, idx_list):
            out[i] = SparsePatch(metas[i].name, idx, values[i])
    _check_counts(metas, checks)
    if host_error is not None:
        raise host_error
    return out  # type: ignore[return-value]
