"""The per-tensor sparse encoding reference: the implementation before batching (one sort and host
sync per tensor), kept as an independent check. tests/unit/test_transfer_batched.py requires the batched
code to reproduce its statistics, metas and bytes exactly. CPU only."""

from __future__ import annotations

import torch

from wsync.transfer.encodings import AUTO_ORDER, SparseMeta, SparsePatch
from wsync.transfer.meta import TensorMeta, bytes_view, view_as_dtype

ESC = 255
GAP_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def ref_sorted(patch: SparsePatch) -> tuple[torch.Tensor, torch.Tensor]:
    idx = patch.indices.long()
    if idx.numel() <= 1:
        return idx, patch.values
    s, perm = torch.sort(idx)
    return s, patch.values[perm]


def ref_gaps(s: torch.Tensor) -> torch.Tensor:
    return torch.diff(s, prepend=torch.full((1,), -1, dtype=s.dtype)) - 1


def ref_rows_ok(s: torch.Tensor, shape: list[int]) -> bool:
    if len(shape) != 2 or shape[1] == 0 or s.numel() % shape[1]:
        return False
    cols = shape[1]
    m = s.view(-1, cols)
    return bool(((m - m[:, :1]) == torch.arange(cols)).all() & (m[:, 0] % cols == 0).all())


def ref_index_stats(s: torch.Tensor, shape: list[int]) -> tuple[int, int, int, bool, int]:
    """(min gap, max gap, last index, rows_ok, gap8 escapes) of sorted, non-empty `s`."""
    g = ref_gaps(s)
    esc = int(torch.div(g.clamp(min=0), ESC, rounding_mode="floor").sum())
    return int(g.min()), int(g.max()), int(s[-1]), ref_rows_ok(s, shape), esc


def ref_candidate_sizes(patch: SparsePatch, spec: TensorMeta, full_ok: bool) -> dict[str, int]:
    c, isz, numel = patch.count, spec.itemsize, spec.numel
    sizes = {"bitmask": c * isz + (numel + 7) // 8 if c else 0}
    if c == 0:
        sizes["gap"] = sizes["gap8"] = sizes["rows"] = 0
    else:
        min_gap, max_gap, last, rows_ok, escapes = ref_index_stats(ref_sorted(patch)[0], spec.shape)
        if min_gap < 0 or last >= numel:
            raise ValueError(f"{spec.name}: indices must be unique and in [0, {numel})")
        sizes["gap"] = c * (isz + (1 if max_gap < 2**8 else 2 if max_gap < 2**16 else 4))
        sizes["gap8"] = c * (isz + 1) + escapes
        if rows_ok:
            sizes["rows"] = c * isz + (c // spec.shape[1]) * 4
    if full_ok or c == numel:
        sizes["dense"] = numel * isz
    return sizes


def ref_plan_one(patch: SparsePatch, spec: TensorMeta, encoding: str, full_ok: bool) -> SparseMeta:
    if encoding == "flat_int32":
        enc, nbytes = "flat_int32", patch.count * (4 + spec.itemsize)
    else:
        sizes = ref_candidate_sizes(patch, spec, full_ok)
        if encoding == "auto":
            enc = min(sizes, key=lambda e: (sizes[e], AUTO_ORDER.index(e)))
        elif encoding in sizes:
            enc = encoding
        else:
            raise ValueError(f"{patch.name}: encoding {encoding!r} does not fit this patch")
        nbytes = sizes[enc]
    count = spec.numel if enc == "dense" else patch.count
    return SparseMeta(patch.name, spec.dtype, list(spec.shape), count, enc, nbytes)


def ref_encode(patch: SparsePatch, meta: SparseMeta, full: torch.Tensor | None = None) -> torch.Tensor:
    if meta.encoding == "dense":
        if patch.count == meta.spec.numel:
            return bytes_view(ref_sorted(patch)[1].contiguous())
        return bytes_view(full.contiguous())
    if meta.count == 0:
        return torch.empty(0, dtype=torch.uint8)
    if meta.encoding == "flat_int32":
        return torch.cat([bytes_view(patch.indices.to(torch.int32).contiguous()),
                          bytes_view(patch.values.contiguous())])
    s, vals = ref_sorted(patch)
    vals_b = bytes_view(vals.contiguous())
    g = ref_gaps(s)
    if meta.encoding == "gap":
        width = (meta.nbytes - vals_b.numel()) // meta.count
        if width == 2:
            g = torch.where(g >= 2**15, g - 2**16, g)
        tail = bytes_view(g.to(GAP_DTYPES[width]))
    elif meta.encoding == "gap8":
        k = torch.div(g, ESC, rounding_mode="floor")
        ends = torch.cumsum(k + 1, 0) - 1
        tail = torch.full((int(ends[-1]) + 1,), ESC, dtype=torch.uint8)
        tail[ends] = (g - k * ESC).to(torch.uint8)
    elif meta.encoding == "bitmask":
        nb = (meta.spec.numel + 7) // 8
        mask = torch.zeros(nb * 8, dtype=torch.uint8)
        mask[s] = 1
        tail = (mask.view(nb, 8) << torch.arange(8, dtype=torch.uint8)).sum(1).to(torch.uint8)
    else:  # rows
        tail = bytes_view((s[:: meta.shape[1]] // meta.shape[1]).to(torch.int32))
    return torch.cat([vals_b, tail])


def ref_decode(meta: SparseMeta, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 indices, values) of one encoded patch."""
    dt, c = meta.spec.torch_dtype, meta.count
    if c == 0:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=dt)
    if meta.encoding == "flat_int32":
        return view_as_dtype(buf[: 4 * c], torch.int32).long(), view_as_dtype(buf[4 * c:], dt)
    vals = view_as_dtype(buf[: c * dt.itemsize], dt)
    tail = buf[c * dt.itemsize:]
    if meta.encoding == "gap":
        width = tail.numel() // c
        g = view_as_dtype(tail, GAP_DTYPES[width]).long()
        g = g & 0xFFFF if width == 2 else g
        return torch.cumsum(g + 1, 0) - 1, vals
    if meta.encoding == "gap8":
        b = tail.long()
        pos = torch.cumsum(torch.where(b == ESC, b, b + 1), 0) - 1
        return pos[b != ESC], vals
    if meta.encoding == "bitmask":
        bits = ((tail.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).view(-1)[: meta.spec.numel]
        return torch.nonzero(bits).view(-1), vals
    if meta.encoding == "rows":
        rows = view_as_dtype(tail, torch.int32).long()
        return (rows.unsqueeze(1) * meta.shape[1] + torch.arange(meta.shape[1])).reshape(-1), vals
    return torch.arange(meta.spec.numel), vals
