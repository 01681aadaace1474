"""Sparse wire encodings: one tensor's patch <-> raw bytes, bit-exact. The public face of the
encodings; the batched machinery lives in common (names, dataclasses, helpers), stats
(index statistics), pack (encode) and unpack (decode).

Layouts (c = count, values are the param dtype's raw bits, indices sorted ascending unless noted):
  flat_int32: int32 indices (given order) | values               (vLLM's wire, sent as two broadcasts)
  gap:        values | gaps (uint8 / int16-as-uint16 / int32), gap0 = i0, gapk = ik - ik-1 - 1;
              the width is (nbytes - c*itemsize) / c
  gap8:       values | uint8 gaps with escapes: a gap g is written as g // 255 bytes of 255 then g % 255,
              so dense-ish patches (gaps mostly < 255) cost ~1 index byte per element
  bitmask:    values | ceil(numel/8) bytes, bit j of byte b marks element 8b+j
  (an empty patch is 0 bytes in every encoding)
  rows:       values (whole rows, row-major) | int32 row ids    (2-D tensors, whole rows only)
  dense:      all numel values in element order                (internal; chosen by auto)

Batched: every entry point works on many patches at once with O(1) host syncs, not one per tensor.
`plan_stats` gets all patches' index statistics in one pass and ONE host sync (a second only when
some patch is not ascending) and caches them on the indices, so `encode_pieces` / `encode` of the
same patches afterwards needs neither a sort nor a host sync. Encoding a batch is a handful of
kernels per encoding, not per tensor; `decode_many` is one host sync (the index-count checks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..meta import TensorMeta
from .common import (
    AUTO,
    AUTO_ORDER,
    BITMASK,
    DENSE,
    ENCODINGS,
    FLAT,
    GAP,
    GAP8,
    ROWS,
    WIRE_ENCODINGS,
    SparseMeta,
    SparsePatch,
    check_numel,
    gap_width,
    rows_cols,
)
from .pack import encode_pieces
from .stats import IndexStats, stats_for
from .unpack import decode_many

__all__ = [
    "FLAT", "GAP", "GAP8", "BITMASK", "ROWS", "DENSE", "AUTO", "ENCODINGS", "WIRE_ENCODINGS", "AUTO_ORDER",
    "SparsePatch", "SparseMeta", "IndexStats", "check_numel", "candidate_sizes", "plan_stats", "encoded_sizes",
    "encode", "encode_pieces", "decode", "decode_many",
]


# ---- planning -----------------------------------------------------------------------------------
def encoded_sizes(count: int, spec: TensorMeta, full_ok: bool, st: IndexStats | None) -> dict[str, int]:
    """Encoded bytes of every valid compact encoding of a patch of `count` indices with these
    statistics (None for an empty patch); `full_ok`: the full tensor is at hand for dense.
    Raises ValueError for duplicate or out-of-range indices (host only, no sync)."""
    c, isz, numel = count, spec.itemsize, spec.numel
    sizes = {BITMASK: c * isz + (numel + 7) // 8 if c else 0}
    if c == 0 or st is None:  # nothing to send, whatever the encoding
        sizes[GAP] = sizes[GAP8] = sizes[ROWS] = 0
    else:
        if not st.ok or st.last >= numel:
            raise ValueError(f"{spec.name}: indices must be unique and in [0, {numel})")
        sizes[GAP] = c * (isz + gap_width(st.max_gap))
        if st.escapes is not None:
            sizes[GAP8] = c * (isz + 1) + st.escapes
        cols = rows_cols(spec.shape, c)
        if st.rows_ok(cols):
            sizes[ROWS] = c * isz + (c // cols) * 4
    if full_ok or c == numel:
        sizes[DENSE] = numel * isz
    return sizes


def plan_stats(patches: Sequence[SparsePatch], specs: Sequence[TensorMeta], encoding: str) -> list[IndexStats | None]:
    """Index statistics of each patch for planning `encoding` (what `encoded_sizes` needs; None for
    empty patches and for flat_int32, which needs none): one batched pass and one host sync per
    device (two when some patch is not ascending), cached on the indices for `encode`."""
    out: list[IndexStats | None] = [None] * len(patches)
    if encoding == FLAT:
        return out
    ids = [i for i, p in enumerate(patches) if p.count]
    cols = [rows_cols(specs[i].shape, patches[i].count) if encoding in (AUTO, ROWS) else 0 for i in ids]
    stats = stats_for([patches[i].indices for i in ids], cols, encoding in (AUTO, GAP8))
    for i, st in zip(ids, stats):
        out[i] = st
    return out


def candidate_sizes(patch: SparsePatch, spec: TensorMeta, full_ok: bool) -> dict[str, int]:
    """Encoded bytes of every valid compact encoding for this patch (at most one host sync; none
    when the patch's indices were planned before)."""
    c = patch.count
    st = stats_for([patch.indices], [rows_cols(spec.shape, c)], True)[0] if c else None
    return encoded_sizes(c, spec, full_ok, st)


# ---- one patch ----------------------------------------------------------------------------------
def encode(patch: SparsePatch, meta: SparseMeta, full: torch.Tensor | None = None) -> torch.Tensor:
    """The patch as `meta.nbytes` uint8 bytes in `meta.encoding` (`full` only for dense of a partial patch).

    No sort and no host sync when `plan_sparse` planned this patch's indices (cached statistics);
    otherwise one host sync. Bitmask rejects indices outside [0, numel) (ValueError)."""
    (pieces,) = encode_pieces([(patch, meta, full)])
    if meta.encoding == DENSE and patch.count != meta.spec.numel:
        return pieces[0]  # the full tensor's bytes (a view, as before)
    if not pieces:
        return torch.empty(0, dtype=torch.uint8, device=patch.values.device)
    return torch.cat(pieces)


def decode(meta: SparseMeta, buf: torch.Tensor, device: torch.device | str | None = None) -> SparsePatch:
    """Bytes from `encode` back to a SparsePatch (int32 indices, values sharing `buf` where aligned)."""
    check_numel(meta.spec)
    if device is not None:
        buf = buf.to(device)
    return decode_many([meta], [buf])[0]
