"""Sparse wire encodings: one tensor's patch <-> raw bytes, bit-exact.

Layouts (c = count, values are the param dtype's raw bits, indices sorted ascending unless noted):
  flat_int32: int32 indices (given order) | values               (vLLM's wire, sent as two broadcasts)
  delta:      values | gaps (uint8 / int16-as-uint16 / int32), gap0 = i0, gapk = ik - ik-1 - 1;
              the width is (nbytes - c*itemsize) / c
  delta8:     values | uint8 gaps with escapes: a gap g is written as g // 255 bytes of 255 then g % 255,
              so dense-ish patches (gaps mostly < 255) cost ~1 index byte per element
  bitmask:    values | ceil(numel/8) bytes, bit j of byte b marks element 8b+j
  (an empty patch is 0 bytes in every encoding)
  rows:       values (whole rows, row-major) | int32 row ids    (2-D tensors, whole rows only)
  dense:      all numel values in element order                (internal; chosen by auto)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .meta import INT32_MAX, TensorMeta, bytes_view, dtype_name, torch_dtype, view_as_dtype

FLAT, DELTA, DELTA8, BITMASK, ROWS, DENSE, AUTO = (
    "flat_int32", "delta", "delta8", "bitmask", "rows", "dense", "auto")
ENCODINGS = (FLAT, DELTA, DELTA8, BITMASK, ROWS, AUTO)  # what callers may ask for
WIRE_ENCODINGS = (FLAT, DELTA, DELTA8, BITMASK, ROWS, DENSE)  # what a SparseMeta may carry
AUTO_ORDER = (DELTA8, DELTA, ROWS, BITMASK, DENSE)  # tie-break among equal sizes
_ESC = 255
_GAP_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@dataclass
class SparsePatch:
    """One tensor's change: flat int32 element indices and the new values (param dtype)."""

    name: str
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.indices.numel())

    def to(self, device: torch.device | str) -> "SparsePatch":
        return SparsePatch(self.name, self.indices.to(device), self.values.to(device))


@dataclass
class SparseMeta:
    """Out-of-band description of one tensor's encoded patch (JSON-able)."""

    name: str
    dtype: str
    shape: list[int]
    count: int
    encoding: str
    nbytes: int

    def __post_init__(self) -> None:
        if self.encoding not in WIRE_ENCODINGS:
            raise ValueError(f"{self.name}: unknown wire encoding {self.encoding!r}")
        self.shape = [int(s) for s in self.shape]
        self.dtype = dtype_name(torch_dtype(self.dtype))

    @property
    def spec(self) -> TensorMeta:
        return TensorMeta(self.name, self.dtype, self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "count": self.count,
                "encoding": self.encoding, "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SparseMeta":
        return cls(d["name"], d["dtype"], list(d["shape"]), int(d["count"]), d["encoding"], int(d["nbytes"]))


def check_numel(spec: TensorMeta) -> None:
    """int32 indices address at most 2**31-1 elements."""
    if spec.numel > INT32_MAX:
        raise ValueError(f"{spec.name}: {spec.numel} elements exceed the int32 index range "
                         f"(2**31-1); sparse sync cannot address this tensor")


def _sorted(patch: SparsePatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int64, ascending) and values permuted to match."""
    idx = patch.indices.long()
    if idx.numel() <= 1:
        return idx, patch.values
    s, perm = torch.sort(idx)
    return s, patch.values[perm.to(patch.values.device)]


def _gaps(s: torch.Tensor) -> torch.Tensor:
    return torch.diff(s, prepend=torch.full((1,), -1, dtype=s.dtype, device=s.device)) - 1


def _gap_width(max_gap: int) -> int:
    return 1 if max_gap < 2**8 else 2 if max_gap < 2**16 else 4


def _rows_ok(s: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """True iff the sorted index set `s` is exactly a set of whole rows of a 2-D tensor."""
    if len(shape) != 2 or shape[1] == 0 or s.numel() % shape[1]:
        return torch.zeros((), dtype=torch.bool, device=s.device)
    cols = shape[1]
    m = s.view(-1, cols)
    same_row = ((m - m[:, :1]) == torch.arange(cols, device=s.device)).all()
    return same_row & (m[:, 0] % cols == 0).all()


def _index_stats(s: torch.Tensor, shape: list[int]) -> tuple[int, int, int, bool, int]:
    """(min gap, max gap, last index, rows_ok, delta8 escape bytes) with one host sync; s sorted, non-empty."""
    g = _gaps(s)
    esc = torch.div(g.clamp(min=0), _ESC, rounding_mode="floor").sum()
    stats = torch.stack([g.min(), g.max(), s[-1], _rows_ok(s, shape).long(), esc]).tolist()
    return int(stats[0]), int(stats[1]), int(stats[2]), bool(stats[3]), int(stats[4])


def candidate_sizes(patch: SparsePatch, spec: TensorMeta, full_ok: bool) -> dict[str, int]:
    """Encoded bytes of every valid compact encoding for this patch (one host sync)."""
    c, isz, numel = patch.count, spec.itemsize, spec.numel
    sizes = {BITMASK: c * isz + (numel + 7) // 8 if c else 0}
    if c == 0:  # nothing to send, whatever the encoding
        sizes[DELTA] = sizes[DELTA8] = sizes[ROWS] = 0
    else:
        min_gap, max_gap, last, rows_ok, escapes = _index_stats(_sorted(patch)[0], spec.shape)
        if min_gap < 0 or last >= numel:
            raise ValueError(f"{spec.name}: indices must be unique and in [0, {numel})")
        sizes[DELTA] = c * (isz + _gap_width(max_gap))
        sizes[DELTA8] = c * (isz + 1) + escapes
        if rows_ok:
            sizes[ROWS] = c * isz + (c // spec.shape[1]) * 4
    if full_ok or c == numel:
        sizes[DENSE] = numel * isz
    return sizes


def _pack_bits(s: torch.Tensor, numel: int) -> torch.Tensor:
    nb = (numel + 7) // 8
    mask = torch.zeros(nb * 8, dtype=torch.uint8, device=s.device)
    mask[s] = 1
    shifts = torch.arange(8, dtype=torch.uint8, device=s.device)
    return (mask.view(nb, 8) << shifts).sum(1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:numel]
    return torch.nonzero(bits).view(-1)


def _encode_gaps(s: torch.Tensor, width: int) -> torch.Tensor:
    g = _gaps(s)
    lo, hi = torch.stack([g.min(), g.max()]).tolist()
    if hi >= 2 ** (8 * width) or lo < 0:
        raise ValueError(f"delta gaps do not fit {width} byte(s) (indices unsorted/duplicate?)")
    if width == 2:
        g = torch.where(g >= 2**15, g - 2**16, g)
    return bytes_view(g.to(_GAP_DTYPES[width]))


def _decode_gaps(raw: torch.Tensor, width: int) -> torch.Tensor:
    g = view_as_dtype(raw, _GAP_DTYPES[width]).long()
    return g & 0xFFFF if width == 2 else g


def _encode_escaped(s: torch.Tensor) -> torch.Tensor:
    """delta8 gap bytes: each gap g as g // 255 escape bytes (255) followed by g % 255."""
    g = _gaps(s)
    if bool((g < 0).any()):
        raise ValueError("delta8 gaps need sorted unique indices")
    k = torch.div(g, _ESC, rounding_mode="floor")
    ends = torch.cumsum(k + 1, 0) - 1  # where each element's final byte goes
    out = torch.full((int(ends[-1]) + 1,), _ESC, dtype=torch.uint8, device=s.device)
    out[ends] = (g - k * _ESC).to(torch.uint8)
    return out


def _decode_escaped(raw: torch.Tensor) -> torch.Tensor:
    """Inverse of _encode_escaped: escape bytes add 255, other bytes close an element (gap + 1)."""
    b = raw.long()
    pos = torch.cumsum(torch.where(b == _ESC, b, b + 1), 0) - 1
    return pos[b != _ESC]


def _encode_dense(patch: SparsePatch, spec: TensorMeta, full: torch.Tensor | None) -> torch.Tensor:
    if patch.count == spec.numel:
        return bytes_view(_sorted(patch)[1].contiguous())
    if full is None:
        raise ValueError(f"{spec.name}: dense encoding of a partial patch needs the full tensor")
    if list(full.shape) != spec.shape or full.dtype != spec.torch_dtype:
        raise ValueError(f"{spec.name}: full tensor does not match {spec.dtype}{spec.shape}")
    return bytes_view(full.detach().contiguous())


def _encode_sorted(patch: SparsePatch, meta: SparseMeta) -> torch.Tensor:
    s, vals = _sorted(patch)
    vals_b = bytes_view(vals.contiguous())
    if meta.encoding == DELTA:
        tail = _encode_gaps(s, (meta.nbytes - vals_b.numel()) // meta.count)
    elif meta.encoding == DELTA8:
        tail = _encode_escaped(s)
    elif meta.encoding == BITMASK:
        tail = _pack_bits(s, meta.spec.numel)
    else:  # ROWS
        if not bool(_rows_ok(s, meta.shape)):
            raise ValueError(f"{meta.name}: rows encoding needs whole rows of a 2-D tensor")
        tail = bytes_view((s[:: meta.shape[1]] // meta.shape[1]).to(torch.int32))
    return torch.cat([vals_b, tail.to(vals_b.device)])


def encode(patch: SparsePatch, meta: SparseMeta, full: torch.Tensor | None = None) -> torch.Tensor:
    """The patch as `meta.nbytes` uint8 bytes in `meta.encoding` (`full` only for dense of a partial patch)."""
    check_numel(meta.spec)
    if patch.values.dtype != meta.spec.torch_dtype:
        raise ValueError(f"{meta.name}: values are {patch.values.dtype}, meta says {meta.dtype}")
    if meta.encoding == DENSE:
        out = _encode_dense(patch, meta.spec, full)
    elif patch.count != meta.count:
        raise ValueError(f"{meta.name}: patch has {patch.count} elements, meta says {meta.count}")
    elif meta.count == 0:
        out = torch.empty(0, dtype=torch.uint8, device=patch.values.device)
    elif meta.encoding == FLAT:
        idx_b = bytes_view(patch.indices.to(torch.int32).contiguous())
        out = torch.cat([idx_b, bytes_view(patch.values.contiguous()).to(idx_b.device)])
    else:
        out = _encode_sorted(patch, meta)
    if out.numel() != meta.nbytes:
        raise ValueError(f"{meta.name}: encoded {out.numel()} bytes, meta says {meta.nbytes}")
    return out


def _decode_indices(meta: SparseMeta, tail: torch.Tensor) -> torch.Tensor:
    """int64 indices from the part after the values."""
    c, numel, dev = meta.count, meta.spec.numel, tail.device
    if meta.encoding == DELTA:
        width = tail.numel() // c
        if width not in _GAP_DTYPES or width * c != tail.numel():
            raise ValueError(f"{meta.name}: {tail.numel()} gap bytes for {c} indices")
        return torch.cumsum(_decode_gaps(tail, width) + 1, 0) - 1
    if meta.encoding == DELTA8:
        idx = _decode_escaped(tail)
        if idx.numel() != c:
            raise ValueError(f"{meta.name}: delta8 stream holds {idx.numel()} indices, meta says {c}")
        return idx
    if meta.encoding == BITMASK:
        idx = _unpack_bits(tail, numel)
        if idx.numel() != c:
            raise ValueError(f"{meta.name}: bitmask marks {idx.numel()} elements, meta says {c}")
        return idx
    if meta.encoding == ROWS:
        rows = view_as_dtype(tail, torch.int32).long()
        cols = meta.shape[1]
        return (rows.unsqueeze(1) * cols + torch.arange(cols, device=dev)).reshape(-1)
    return torch.arange(numel, device=dev)  # DENSE


def decode(meta: SparseMeta, buf: torch.Tensor, device: torch.device | str | None = None) -> SparsePatch:
    """Bytes from `encode` back to a SparsePatch (int32 indices, values sharing `buf` where aligned)."""
    check_numel(meta.spec)
    if device is not None:
        buf = buf.to(device)
    if buf.dtype != torch.uint8 or buf.numel() != meta.nbytes:
        raise ValueError(f"{meta.name}: expected {meta.nbytes} uint8 bytes, got {buf.numel()} {buf.dtype}")
    dt, c = meta.spec.torch_dtype, meta.count
    if meta.encoding == DENSE and c != meta.spec.numel:
        raise ValueError(f"{meta.name}: dense meta count {c} != numel {meta.spec.numel}")
    if c == 0:
        return SparsePatch(meta.name, torch.empty(0, dtype=torch.int32, device=buf.device),
                           torch.empty(0, dtype=dt, device=buf.device))
    if meta.encoding == FLAT:
        idx = view_as_dtype(buf[: 4 * c], torch.int32)
        return SparsePatch(meta.name, idx, view_as_dtype(buf[4 * c:], dt))
    vals = view_as_dtype(buf[: c * dt.itemsize], dt)
    idx = _decode_indices(meta, buf[c * dt.itemsize:])
    return SparsePatch(meta.name, idx.to(torch.int32), vals)
