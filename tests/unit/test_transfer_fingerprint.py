"""Fingerprints are exact: equal bits give equal prints, any single bit flip changes them."""

from __future__ import annotations

import torch

from wsync.transfer import digest, fingerprint


def test_equal_bits_equal_prints_and_metadata() -> None:
    torch.manual_seed(0)
    a = torch.randn(33, 7).to(torch.bfloat16)
    fa = fingerprint([("a", a)])["a"]
    assert fa == fingerprint({"a": a.clone()})["a"]
    assert fa.startswith("bfloat16[33,7]:")
    assert fingerprint([("a", a.view(7, 33))])["a"] != fa  # shape is part of it
    assert fingerprint([("a", a.view(torch.int16))])["a"] != fa  # dtype too


def test_every_single_bit_flip_changes_print() -> None:
    torch.manual_seed(1)
    for t in (torch.randn(5, 3).to(torch.bfloat16), torch.randn(4), torch.randn(3).to(torch.float16)):
        base = fingerprint([("t", t)])["t"]
        raw = t.reshape(-1).view(torch.uint8)
        for byte in range(raw.numel()):
            for bit in range(8):
                flipped = raw.clone()
                flipped[byte] ^= 1 << bit
                assert fingerprint([("t", flipped.view(t.dtype).view(t.shape))])["t"] != base, (byte, bit)


def test_swapped_words_change_print() -> None:
    t = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert fingerprint({"t": t}) != fingerprint({"t": t.flip(0)})


def test_noncontiguous_empty_scalar_and_all() -> None:
    x = torch.arange(12.0).view(3, 4)
    assert fingerprint({"x": x.t()})["x"] == fingerprint({"x": x.t().contiguous()})["x"]
    fingerprint({"e": torch.empty(0, 4), "s": torch.tensor(2.5), "b": torch.tensor([True, False, True])})
    named = {"x": x, "y": torch.ones(3)}
    assert digest(fingerprint(named)) == digest(fingerprint(list(reversed(list(named.items())))))
    assert len(digest(fingerprint(named))) == 64
    y2 = torch.ones(3)
    y2[1] = 1.0000001
    assert digest(fingerprint(named)) != digest(fingerprint({"x": x, "y": y2}))


def test_sums_use_chunks(monkeypatch) -> None:
    import importlib

    fp_mod = importlib.import_module("wsync.transfer.fingerprint")  # the package attr is the function

    t = torch.randn(1000)
    whole = fp_mod.fingerprint_tensor(t)
    monkeypatch.setattr(fp_mod, "CHUNK_WORDS", 7)
    assert fp_mod.fingerprint_tensor(t) == whole
