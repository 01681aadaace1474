"""Reference, random and inline patches: selection, in-place application, digest, payload."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from wsync import patches as P
from wsync.models.tiny import build_tiny_model
from wsync.patches import (
    PreparedPatch,
    SparsePatch,
    apply_inline,
    patch_digest,
    random_patch,
    reference_patch,
    select_reference_rows,
)
from wsync.schemas.common import REFERENCE_PROMPTS

EMB = "model.embed_tokens.weight"


@pytest.fixture(scope="session")
def patches_tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-patches") / "model")


@pytest.fixture(scope="session")
def tok(patches_tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(patches_tiny_dir)


@pytest.fixture()
def model(patches_tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(patches_tiny_dir).eval()


class SmallNet(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(64, 48, generator=g).to(torch.bfloat16))
        self.b = torch.nn.Parameter(torch.randn(200, generator=g))  # float32
        self.c = torch.nn.Parameter(torch.randn(7, 5, generator=g).to(torch.float16))
        self.register_buffer("steps", torch.zeros(3, dtype=torch.long))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _independent_digest(patches) -> str:
    h = hashlib.sha256()
    for p in patches:
        h.update(p.indices.cpu().numpy().tobytes() + p.values.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# ---------------------------------------------------------------------------- selection


def _straightforward_selection(tokenizer, prompts, max_rows, vocab_size):
    """vLLM rlhf_sparse_nccl.py's prepare_sparse_patch selection, written out plainly."""
    selected = []
    special = set(tokenizer.all_special_ids)
    for prompt in prompts:
        for t in tokenizer(prompt, add_special_tokens=False)["input_ids"]:
            if t in special or t in selected:
                continue
            selected.append(t)
            if len(selected) == max_rows:
                break
        if len(selected) == max_rows:
            break
    if not selected:
        raise ValueError("none")
    nxt = selected[-1]
    while len(selected) < max_rows:
        nxt = (nxt + 1) % vocab_size
        if nxt in special or nxt in selected:
            continue
        selected.append(nxt)
    return selected


class FakeTokenizer:
    def __init__(self, table: dict[str, list[int]], special: list[int]):
        self.table, self.all_special_ids = table, special

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": list(self.table[text])}


@pytest.mark.parametrize("rows", [1, 3, 5, 16, 32, 100])
def test_selection_matches_reference(tok, rows):
    prompts = list(REFERENCE_PROMPTS) + ["<|im_start|>user\nThe capital of France is Paris<|im_end|>"]
    for ps in (prompts, prompts[:1], prompts[::-1]):
        assert select_reference_rows(tok, ps, rows, 8192) == _straightforward_selection(tok, ps, rows, 8192)


def test_selection_reference_prompts_values(tok):
    sel = select_reference_rows(tok, REFERENCE_PROMPTS, 32, 8192)
    prompt_ids = []
    for p in REFERENCE_PROMPTS:
        for t in tok(p, add_special_tokens=False)["input_ids"]:
            if t not in prompt_ids:
                prompt_ids.append(t)
    assert sel[: len(prompt_ids)] == prompt_ids
    assert len(sel) == 32 == len(set(sel))
    tail = sel[len(prompt_ids):]
    assert tail == list(range(prompt_ids[-1] + 1, prompt_ids[-1] + 1 + len(tail)))  # no specials there


def test_selection_wraps_and_skips_specials():
    t = FakeTokenizer({"a": [0, 9, 8, 9], "b": [7]}, special=[0, 1])
    expected = _straightforward_selection(t, ["a", "b"], 8, 10)
    assert select_reference_rows(t, ["a", "b"], 8, 10) == expected == [9, 8, 7, 2, 3, 4, 5, 6]
    assert select_reference_rows(t, ["b"], 3, 10) == [7, 8, 9]
    assert select_reference_rows(t, ["b"], 4, 10) == [7, 8, 9, 2]  # wraps past 0 and 1 (special)
    assert select_reference_rows(t, ["a"], 8, 10) == _straightforward_selection(t, ["a"], 8, 10)


def test_selection_errors():
    t = FakeTokenizer({"s": [0, 1], "": [], "x": [5]}, special=[0, 1])
    with pytest.raises(ValueError):
        select_reference_rows(t, ["s", ""], 4, 10)
    with pytest.raises(ValueError):
        select_reference_rows(t, ["x"], 9, 10)  # only 8 non-special ids exist: would loop forever
    assert len(select_reference_rows(t, ["x"], 8, 10)) == 8
    with pytest.raises(ValueError):
        select_reference_rows(t, ["x"], 0, 10)


# ---------------------------------------------------------------------------- reference patch


def test_reference_patch_rotates_rows_and_digest(model, tok):
    emb = model.get_parameter(EMB)
    before = emb.detach().clone()
    hidden = emb.shape[1]
    prep = reference_patch(model, tok, REFERENCE_PROMPTS, rows=32)
    assert isinstance(prep, PreparedPatch)
    sel = prep.selected_token_ids
    assert sel == _straightforward_selection(tok, REFERENCE_PROMPTS, 32, emb.shape[0])
    rows = torch.tensor(sel)
    # Row i now holds what row i-1 held (roll by one), the first holds the last's.
    assert torch.equal(emb.detach()[rows], before[rows].roll(1, 0))
    mask = torch.ones(emb.shape[0], dtype=torch.bool)
    mask[rows] = False
    assert torch.equal(emb.detach()[mask], before[mask])
    (patch,) = prep.patches
    assert patch.name == EMB
    assert patch.indices.dtype == torch.int32 and patch.indices.dim() == 1
    assert patch.indices.numel() == 32 * hidden == patch.values.numel()
    assert torch.unique(patch.indices).numel() == patch.indices.numel()
    expected_idx = (rows[:, None] * hidden + torch.arange(hidden)).reshape(-1).to(torch.int32)
    assert torch.equal(patch.indices, expected_idx)
    assert patch.values.dtype == torch.bfloat16
    assert torch.equal(patch.values, emb.detach().reshape(-1)[patch.indices.long()])
    assert prep.digest == _independent_digest([patch]) == patch_digest(prep.patches)
    assert prep.payload_bytes == patch.indices.numel() * (4 + 2)
    # The tied lm_head sees the same change.
    assert torch.equal(model.lm_head.weight.detach(), emb.detach())


def test_reference_patch_is_deterministic(patches_tiny_dir, tok):
    from transformers import AutoModelForCausalLM

    digests = set()
    for _ in range(2):
        m = AutoModelForCausalLM.from_pretrained(patches_tiny_dir)
        digests.add(reference_patch(m, tok, REFERENCE_PROMPTS).digest)
    assert len(digests) == 1


def test_reference_patch_errors(model, tok):
    with pytest.raises(ValueError):
        reference_patch(model, tok, REFERENCE_PROMPTS, param="model.nope.weight")
    with pytest.raises(ValueError):
        reference_patch(model, tok, REFERENCE_PROMPTS, param="model.norm.weight")  # 1-D


# ---------------------------------------------------------------------------- random patch


def _check_random(net, before, prep, density):
    params = dict(net.named_parameters())
    for patch in prep.patches:
        p = params[patch.name]
        flat_before = before[patch.name].reshape(-1)
        flat_after = p.detach().reshape(-1)
        n = patch.indices.numel()
        assert n == round(density * p.numel())
        assert patch.indices.dtype == torch.int32 and patch.values.dtype == p.dtype
        idx = patch.indices.long()
        assert torch.equal(idx, torch.unique(idx))  # sorted, unique
        assert int(idx.min()) >= 0 and int(idx.max()) < p.numel()
        assert torch.isfinite(patch.values.float()).all()
        assert torch.equal(flat_after[idx], patch.values)
        old = flat_before[idx]
        assert bool((patch.values != old).all())  # numerically different
        assert bool((_bits(patch.values) != _bits(old)).all())  # and bit-different
        untouched = torch.ones(p.numel(), dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(_bits(flat_after[untouched]), _bits(flat_before[untouched]))
    assert prep.digest == _independent_digest(prep.patches)
    assert prep.payload_bytes == sum(x.indices.numel() * (4 + x.values.element_size()) for x in prep.patches)
    assert prep.selected_token_ids is None


@pytest.mark.parametrize("density", [0.01, 0.25, 0.5, 1.0])
def test_random_patch_density_and_changes(density):
    net = SmallNet()
    before = _snapshot(net)
    prep = random_patch(net, density, seed=3)
    assert [p.name for p in prep.patches] == [n for n, _ in net.named_parameters() if round(density * _.numel()) > 0]
    _check_random(net, before, prep, density)


def test_random_patch_is_deterministic_and_seeded():
    d1 = random_patch(SmallNet(), 0.1, seed=7)
    d2 = random_patch(SmallNet(), 0.1, seed=7)
    d3 = random_patch(SmallNet(), 0.1, seed=8)
    assert d1.digest == d2.digest != d3.digest
    for a, b in zip(d1.patches, d2.patches):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)


def test_random_patch_params_subset_is_independent_of_others():
    only_a = random_patch(SmallNet(), 0.2, params=["a"], seed=1)
    both = random_patch(SmallNet(), 0.2, params=["c", "a"], seed=1)
    assert [p.name for p in only_a.patches] == ["a"]
    assert [p.name for p in both.patches] == ["c", "a"]
    assert torch.equal(only_a.patches[0].indices, both.patches[1].indices)
    assert torch.equal(only_a.patches[0].values, both.patches[1].values)


def test_random_patch_errors():
    with pytest.raises(ValueError):
        random_patch(SmallNet(), 0.0)
    with pytest.raises(ValueError):
        random_patch(SmallNet(), 1.5)
    with pytest.raises(ValueError):
        random_patch(SmallNet(), 0.1, params=["missing"])
    with pytest.raises(ValueError):
        random_patch(SmallNet(), 1e-6)  # rounds to zero elements everywhere


def test_random_patch_rejection_sampling_path(monkeypatch):
    monkeypatch.setattr(P, "_RANDPERM_MAX_NUMEL", 16)
    net = SmallNet()
    before = _snapshot(net)
    prep = random_patch(net, 0.05, seed=11)
    _check_random(net, before, prep, 0.05)
    again = random_patch(SmallNet(), 0.05, seed=11)
    assert again.digest == prep.digest


def test_random_patch_changes_awkward_values():
    net = torch.nn.Module()
    vals = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, 3.3e38, -3.3e38, 1e-40, 9.2e-41, 65504.0, 2.0**-24], dtype=torch.float32
    )
    net.f32 = torch.nn.Parameter(vals.clone())
    net.bf16 = torch.nn.Parameter(vals.to(torch.bfloat16))
    net.f16 = torch.nn.Parameter(torch.tensor([0.0, -0.0, 65504.0, -65504.0, 2.0**-24, 1.0], dtype=torch.float16))
    before = _snapshot(net)
    prep = random_patch(net, 1.0, seed=0)
    _check_random(net, before, prep, 1.0)


def test_random_patch_on_tiny_model(model):
    before = _snapshot(model)
    prep = random_patch(model, 0.001, seed=0)
    names = [p.name for p in prep.patches]
    assert EMB in names and "lm_head.weight" not in names  # tied: patched once
    _check_random(model, before, prep, 0.001)


# ---------------------------------------------------------------------------- inline and digest


def test_apply_inline_casts_applies_and_digests():
    net = SmallNet()
    before = _snapshot(net)
    incoming = [
        SparsePatch("a", torch.tensor([0, 5, 3071], dtype=torch.int64), torch.tensor([1.5, -2.0, 0.25])),
        SparsePatch("b", torch.tensor([199], dtype=torch.int32), torch.tensor([3.0], dtype=torch.float64)),
    ]
    prep = apply_inline(net, incoming)
    a, b = prep.patches
    assert a.indices.dtype == b.indices.dtype == torch.int32
    assert a.values.dtype == torch.bfloat16 and b.values.dtype == torch.float32
    flat_a = net.a.detach().reshape(-1)
    assert flat_a[0].item() == 1.5 and flat_a[5].item() == -2.0 and flat_a[3071].item() == 0.25
    assert net.b.detach()[199].item() == 3.0
    mask = torch.ones(flat_a.numel(), dtype=torch.bool)
    mask[[0, 5, 3071]] = False
    assert torch.equal(flat_a[mask], before["a"].reshape(-1)[mask])
    assert torch.equal(net.c.detach(), before["c"])
    assert prep.digest == _independent_digest(prep.patches)
    assert prep.payload_bytes == 3 * (4 + 2) + 1 * (4 + 4)
    assert prep.selected_token_ids is None


def test_patch_digest_concatenates_in_order():
    p1 = SparsePatch("x", torch.tensor([1, 2], dtype=torch.int32), torch.tensor([0.5, 1.0], dtype=torch.bfloat16))
    p2 = SparsePatch("y", torch.tensor([0], dtype=torch.int32), torch.tensor([2.0]))
    blob = (
        p1.indices.numpy().tobytes() + p1.values.float().numpy().tobytes()
        + p2.indices.numpy().tobytes() + p2.values.numpy().tobytes()
    )
    assert patch_digest([p1, p2]) == hashlib.sha256(blob).hexdigest()
    assert patch_digest([p2, p1]) != patch_digest([p1, p2])
    assert patch_digest([]) == hashlib.sha256(b"").hexdigest()
