"""Exact, device-side weight fingerprints.

A tensor's bytes are read as unsigned 32-bit words (zero-padded). Two sums are computed on the
tensor's device, in chunks: S1 = sum(words) exactly in int64 (any single bit flip changes it), and
S2 = sum(word * w(pos)) mod P with P = 2**31-1 and position weights w (catches moved words).
Only two int64 scalars per tensor reach the host.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

from .meta import bytes_view, dtype_name

Named = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
P = 2**31 - 1
CHUNK_WORDS = 1 << 24  # bounds temporary memory to a few hundred MiB
_MUL, _ADD = 1_000_003, 12_345


def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as int32 words, zero-padded to a multiple of 4 bytes."""
    raw = bytes_view(t.detach().contiguous())
    pad = -raw.numel() % 4
    if pad:
        raw = torch.cat([raw, torch.zeros(pad, dtype=torch.uint8, device=raw.device)])
    elif raw.storage_offset() % 4:
        raw = raw.clone()
    if raw.numel() == 0:
        return torch.empty(0, dtype=torch.int32, device=raw.device)
    return raw.view(torch.int32)


def _sums(words: torch.Tensor) -> torch.Tensor:
    """[S1, S2] as an int64 tensor on the words' device."""
    s1 = torch.zeros((), dtype=torch.int64, device=words.device)
    s2 = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), CHUNK_WORDS):
        w = words[start:start + CHUNK_WORDS].long() & 0xFFFFFFFF
        s1 += w.sum()
        pos = torch.arange(start, start + w.numel(), dtype=torch.int64, device=w.device)
        weight = (pos % P * _MUL + _ADD) % P + 1
        s2 = (s2 + ((w % P) * weight % P).sum()) % P
    return torch.stack([s1, s2])


def fingerprint_tensor(t: torch.Tensor) -> str:
    """`dtype[shape]:S1:S2` in hex, exact for the tensor's bits."""
    s1, s2 = _sums(_words(t)).tolist()
    shape = ",".join(str(s) for s in t.shape)
    return f"{dtype_name(t.dtype)}[{shape}]:{s1 & (2**64 - 1):016x}:{s2:08x}"


def fingerprint(named_tensors: Named) -> dict[str, str]:
    """{name: fingerprint} computed on each tensor's device ((name, tensor) pairs or a dict)."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    with torch.no_grad():
        return {name: fingerprint_tensor(t) for name, t in items}


def digest(fingerprints: dict[str, str]) -> str:
    """sha256 of a fingerprint dict (as from `fingerprint`), order-independent."""
    h = hashlib.sha256()
    for name in sorted(fingerprints):
        h.update(f"{name}={fingerprints[name]}\n".encode())
    return h.hexdigest()
