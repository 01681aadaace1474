"""Real deltas: diff the trainer's weights against the version last synced to an engine, bit-exactly,
on the tensors' device, and keep that last-synced version per engine.

`diff_patches(current, synced)` compares raw bits (integer views), so -0.0 vs 0.0 and NaN payloads
count as changes, and returns one `SparsePatch` (int32 flat indices in row-major order, ascending;
values = the current bits) per tensor that changed. Cost: one device pass over both versions plus
ONE host sync for the whole model (per-tensor change counts), then `nonzero_static` per tensor.

`Snapshot` keeps, per engine key, a device copy of the weights as last synced to that engine:
`refresh` after a dense sync (a copy into the existing buffers), `update` after a sparse sync (a
scatter, O(changed elements)), `diff` for the next patch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .encodings import SparsePatch
from .meta import INT32_MAX
from .sparse import apply_patch

__all__ = ["diff_patches", "Snapshot", "DeltaError"]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_Named = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


class DeltaError(ValueError):
    """The two weight versions cannot be diffed (names, shapes, dtypes, devices or size)."""


def _items(named: _Named) -> list[tuple[str, torch.Tensor]]:
    return list(named.items()) if isinstance(named, Mapping) else list(named)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as integers of the same width, shape [numel, words] (bit-exact)."""
    flat = t.detach().contiguous().reshape(-1)
    size = flat.element_size()
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    if size in _INT_VIEW:
        return flat.view(_INT_VIEW[size]).unsqueeze(1)
    if size % 8 == 0:  # e.g. complex128: two int64 words per element
        return flat.view(torch.int64).view(-1, size // 8)
    return flat.view(torch.uint8).view(-1, size)


def _check_pair(name: str, cur: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """`old` when it can be diffed against `cur` (same dtype, shape, device; int32-addressable)."""
    if old is None:
        raise DeltaError(f"{name}: no synced version of this tensor")
    if cur.dtype != old.dtype or cur.shape != old.shape:
        raise DeltaError(f"{name}: current is {cur.dtype}{list(cur.shape)}, synced is "
                         f"{old.dtype}{list(old.shape)}")
    if cur.device != old.device:
        raise DeltaError(f"{name}: current is on {cur.device}, synced is on {old.device} (diff runs on "
                         "the tensors' device; keep the snapshot there)")
    if cur.numel() > INT32_MAX:
        raise DeltaError(f"{name}: {cur.numel()} elements exceed the int32 index range (2**31-1); "
                         "a sparse patch cannot address this tensor")
    return old


def _change_masks(pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per tensor, a bool [numel] mask of elements whose bits differ (device-side, no host sync)."""
    masks = []
    for _, cur, old in pairs:
        ne = _bits(cur) != _bits(old)
        masks.append(ne[:, 0] if ne.shape[1] == 1 else ne.any(dim=1))
    return masks


def _host_counts(masks: list[torch.Tensor]) -> list[int]:
    """Changed-element counts of every mask with one host sync per device."""
    counts = [0] * len(masks)
    per_device: dict[torch.device, list[int]] = {}
    for i, m in enumerate(masks):
        per_device.setdefault(m.device, []).append(i)
    for idxs in per_device.values():
        sums = torch.stack([masks[i].sum(dtype=torch.int64) for i in idxs]).tolist()
        for i, c in zip(idxs, sums):
            counts[i] = int(c)
    return counts


_STATIC_OK: dict[str, bool] = {}


def _indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending positions of the set bits; the count is known, so nonzero_static needs no host sync."""
    kind = mask.device.type
    if _STATIC_OK.get(kind, hasattr(torch, "nonzero_static")):
        try:
            return torch.nonzero_static(mask, size=count).view(-1).to(torch.int32)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - a backend without it
            _STATIC_OK[kind] = False
    return torch.nonzero(mask).view(-1).to(torch.int32)


def _gather(cur: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """cur's elements at flat `idx`, moved as integers (bit-exact, NaN payloads included)."""
    flat = cur.contiguous().reshape(-1)
    size = flat.element_size()
    if size in _INT_VIEW and flat.dtype != torch.bool:
        return flat.view(_INT_VIEW[size])[idx.long()].view(flat.dtype)
    return flat[idx.long()]


def diff_patches(current: _Named, synced: _Named, include_empty: bool = False) -> list[SparsePatch]:
    """Patches that turn `synced` into `current`, bit-exactly, in `current`'s order.

    Both sides must hold the same names with equal dtype, shape and device. Tensors with no change
    are left out unless `include_empty`. Indices are int32, ascending, row-major flat positions.
    """
    cur_items = _items(current)
    old = dict(_items(synced))
    names = [n for n, _ in cur_items]
    if len(set(names)) != len(names):
        raise DeltaError("current holds a tensor name twice")
    extra = sorted(set(old) - set(names))
    if extra:
        raise DeltaError(f"synced holds tensors that current lacks: {extra[:5]}")
    pairs = []
    for name, cur in cur_items:
        prev = _check_pair(name, cur, old.get(name))
        pairs.append((name, cur.detach(), prev.detach()))
    with torch.no_grad():
        masks = _change_masks(pairs)
        counts = _host_counts(masks)
        out = []
        for (name, cur, _), mask, count in zip(pairs, masks, counts):
            if count == 0 and not include_empty:
                continue
            idx = _indices(mask, count)
            out.append(SparsePatch(name, idx, _gather(cur, idx)))
    return out


class Snapshot:
    """Per key (an engine, or a weight version that engines serve), a device copy of the weights as
    last synced there."""

    def __init__(self) -> None:
        self._copies: dict[str, dict[str, torch.Tensor]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._copies

    def keys(self) -> list[str]:
        return list(self._copies)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The copy held for `key` (read it, do not write it)."""
        try:
            return self._copies[key]
        except KeyError:
            raise KeyError(f"no snapshot {key!r} (refresh it after a dense sync)") from None

    def nbytes(self, key: str | None = None) -> int:
        keys = self._copies if key is None else [key]
        return sum(t.numel() * t.element_size() for k in keys for t in self._copies[k].values())

    def refresh(self, key: str, named_tensors: _Named) -> None:
        """After a dense sync: the engine now holds `named_tensors` exactly. Existing buffers of the
        same dtype/shape/device are reused (a copy), others are (re)allocated."""
        old = self._copies.get(key, {})
        new: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, t in _items(named_tensors):
                t = t.detach()
                buf = old.get(name)
                if buf is None or buf.dtype != t.dtype or buf.shape != t.shape or buf.device != t.device:
                    buf = torch.empty_like(t, memory_format=torch.contiguous_format)
                buf.copy_(t)
                new[name] = buf
        self._copies[key] = new

    def update(self, key: str, patches: Iterable[SparsePatch]) -> None:
        """After a sparse sync of `patches`: scatter them into the copy (O(changed elements))."""
        copy = self.get(key)
        for patch in patches:
            if patch.name not in copy:
                raise DeltaError(f"{patch.name}: not in the snapshot of {key!r}")
            apply_patch(copy[patch.name], patch)

    def diff(self, key: str, current: _Named, include_empty: bool = False) -> list[SparsePatch]:
        """Patches from the version last synced to `key` to `current`."""
        return diff_patches(current, self.get(key), include_empty)

    def rename(self, old: str, new: str) -> None:
        """Re-key a copy, e.g. once update() moved it forward to a new version (replaces `new`)."""
        copy = self.get(old)
        del self._copies[old]
        self._copies[new] = copy

    def drop(self, key: str) -> None:
        self._copies.pop(key, None)
