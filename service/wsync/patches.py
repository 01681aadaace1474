"""Weight patches the trainer prepares: vLLM's reference patch, seeded random patches, inline patches.

Pure torch (no Ray, no HTTP). Each function applies the patch to the model in place and returns a
:class:`PreparedPatch` whose ``digest`` follows vLLM's RLHF sparse-NCCL example: sha256 over, per
patch in order, the int32 indices' bytes followed by the values' bytes as float32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from wsync.transfer.meta import INT32_MAX
from wsync.transfer.sparse import SparsePatch, payload_bytes

__all__ = [
    "PreparedPatch",
    "SparsePatch",
    "apply_inline",
    "patch_digest",
    "random_patch",
    "reference_patch",
    "select_reference_rows",
]

#: Above this many elements, random index selection samples with rejection instead of randperm.
_RANDPERM_MAX_NUMEL = 1 << 22


@dataclass
class PreparedPatch:
    patches: list[SparsePatch]
    selected_token_ids: list[int] | None
    digest: str
    payload_bytes: int

    @property
    def num_elements(self) -> int:
        return sum(int(p.indices.numel()) for p in self.patches)


# --------------------------------------------------------------------------------------------
# Digest and size
# --------------------------------------------------------------------------------------------


def patch_digest(patches: Iterable[SparsePatch]) -> str:
    """sha256 of, per patch in order, int32 indices bytes + float32 values bytes (vLLM's digest)."""
    h = hashlib.sha256()
    for p in patches:
        h.update(p.indices.detach().to(torch.int32).cpu().contiguous().numpy().tobytes())
        h.update(p.values.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _prepared(patches: list[SparsePatch], selected: list[int] | None = None) -> PreparedPatch:
    return PreparedPatch(
        patches=patches,
        selected_token_ids=selected,
        digest=patch_digest(patches),
        payload_bytes=payload_bytes(patches),
    )


def _get_param(model: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError as exc:
        raise ValueError(f"model has no parameter {name!r}") from exc


def _flat_view(param: torch.Tensor) -> torch.Tensor:
    if not param.is_contiguous():
        raise ValueError("parameter is not contiguous; cannot patch it through a flat view")
    return param.data.view(-1)


# --------------------------------------------------------------------------------------------
# Reference patch (vLLM's rlhf_sparse_nccl.py)
# --------------------------------------------------------------------------------------------


def select_reference_rows(tokenizer, prompts: Sequence[str], rows: int, vocab_size: int) -> list[int]:
    """The rows vLLM's example rotates: the prompts' tokens (no special tokens), in order, no repeats,
    at most ``rows``; if fewer, continue with ``(last + 1) % vocab_size`` skipping special ids/repeats."""
    if rows < 1:
        raise ValueError("rows must be >= 1")
    special_ids = set(tokenizer.all_special_ids)
    selected: list[int] = []
    seen: set[int] = set()
    for prompt in prompts:
        for token_id in tokenizer(prompt, add_special_tokens=False)["input_ids"]:
            if token_id in special_ids or token_id in seen:
                continue
            selected.append(token_id)
            seen.add(token_id)
            if len(selected) == rows:
                break
        if len(selected) == rows:
            break
    if not selected:
        raise ValueError("Could not derive any non-special token IDs to patch")
    if len(selected) < rows:  # the fill below must terminate: enough non-special ids must exist
        specials_in_range = sum(1 for i in special_ids if 0 <= i < vocab_size)
        outside = sum(1 for i in seen if not 0 <= i < vocab_size)
        available = vocab_size - specials_in_range + outside
        if rows > available:
            raise ValueError(f"rows={rows} exceeds the {available} non-special rows available")
    next_token_id = selected[-1]
    while len(selected) < rows:
        next_token_id = (next_token_id + 1) % vocab_size
        if next_token_id in special_ids or next_token_id in seen:
            continue
        selected.append(next_token_id)
        seen.add(next_token_id)
    return selected


def reference_patch(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    rows: int = 32,
    param: str = "model.embed_tokens.weight",
) -> PreparedPatch:
    """Rotate the selected rows of ``param`` by one (in place), exactly as vLLM's example does."""
    p = _get_param(model, param)
    if p.dim() != 2:
        raise ValueError(f"{param!r} must be 2-D (rows x hidden), got shape {list(p.shape)}")
    vocab_size, hidden_size = p.shape
    if vocab_size * hidden_size - 1 > INT32_MAX:
        raise ValueError(f"{param!r} has too many elements for int32 indices")
    selected = select_reference_rows(tokenizer, prompts, rows, vocab_size)
    row_ids = torch.tensor(selected, device=p.device, dtype=torch.long)
    column_offsets = torch.arange(hidden_size, device=p.device, dtype=torch.long)
    with torch.no_grad():
        replacement_rows = p[row_ids].roll(shifts=1, dims=0)
        p[row_ids] = replacement_rows
        flat_indices = row_ids.unsqueeze(1).mul(hidden_size).add(column_offsets).reshape(-1)
        flat_values = p[row_ids].reshape(-1).contiguous()
    patch = SparsePatch(name=param, indices=flat_indices.to(torch.int32), values=flat_values)
    return _prepared([patch], selected)


# --------------------------------------------------------------------------------------------
# Random patch
# --------------------------------------------------------------------------------------------


def _param_seed(seed: int, name: str) -> int:
    """A per-parameter seed, so a parameter's patch does not depend on which others are patched."""
    digest = hashlib.sha256(f"wsync-random-patch:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sample_indices(numel: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` unique sorted indices in ``[0, numel)`` (int64, CPU), deterministic given ``gen``."""
    if k >= numel:
        return torch.arange(numel, dtype=torch.long)
    if numel <= _RANDPERM_MAX_NUMEL or 4 * k >= numel:
        return torch.randperm(numel, generator=gen)[:k].sort().values
    # Large tensor, small fraction: draw with replacement and reject repeats; O(k) memory.
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draw = torch.randint(0, numel, (need + need // 8 + 16,), generator=gen, dtype=torch.long)
        chosen = torch.unique(torch.cat([chosen, draw]))  # sorted
    if chosen.numel() > k:  # drop a random surplus, keeping the choice uniform
        keep = torch.randperm(chosen.numel(), generator=gen)[:k]
        chosen = chosen[keep].sort().values
    return chosen


def _bits(t: torch.Tensor) -> torch.Tensor:
    view_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(view_dtype)


def _perturb(old: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """New finite values, each different from ``old`` (bitwise and numerically) in old's dtype."""
    dtype = old.dtype
    base = old.double()
    scale = base.abs() * 0.1 + 1e-2
    new = (base + torch.randn(base.shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    for _ in range(8):
        bad = ~torch.isfinite(new) | (new == old) | (_bits(new) == _bits(old))
        if not bool(bad.any()):
            return new
        scale = scale * 2
        redo = (base + torch.randn(base.shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        new = torch.where(bad, redo, new)
    # Last resort (never needed in practice): halve non-zeros, set zeros to 0.01.
    bad = ~torch.isfinite(new) | (new == old)
    fallback = torch.where((old == 0) | ~torch.isfinite(old), torch.full_like(old, 0.01), old / 2)
    return torch.where(bad, fallback, new)


def random_patch(
    model: torch.nn.Module,
    density: float,
    params: Sequence[str] | None = None,
    seed: int = 0,
) -> PreparedPatch:
    """Change ``round(density * numel)`` seeded, unique elements of each parameter, in place.

    ``params``: parameter names (default: every floating-point parameter, in ``named_parameters``
    order). Indices are sorted and unique; every chosen element gets a new finite value that differs
    from the old one in the parameter's dtype. Memory is O(changed elements) for large tensors.
    """
    if not (0.0 < float(density) <= 1.0):
        raise ValueError("density must be in (0, 1]")
    if params is None:
        targets = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    else:
        seen: set[str] = set()
        targets = []
        for name in params:
            if name in seen:
                continue
            seen.add(name)
            p = _get_param(model, name)
            if not p.is_floating_point():
                raise ValueError(f"parameter {name!r} is not floating point ({p.dtype})")
            targets.append((name, p))
    if not targets:
        raise ValueError("no parameters to patch")

    patches: list[SparsePatch] = []
    with torch.no_grad():
        for name, p in targets:
            numel = p.numel()
            k = round(float(density) * numel)
            if k == 0:
                continue
            if numel - 1 > INT32_MAX:
                raise ValueError(f"{name!r} has too many elements for int32 indices")
            gen = torch.Generator(device="cpu")
            gen.manual_seed(_param_seed(seed, name))
            idx = _sample_indices(numel, k, gen)
            flat = _flat_view(p)
            idx_dev = idx.to(p.device)
            old = flat.index_select(0, idx_dev).cpu()
            new = _perturb(old, gen).to(p.device)
            flat.index_copy_(0, idx_dev, new)
            patches.append(SparsePatch(name=name, indices=idx_dev.to(torch.int32), values=new))
    if not patches:
        raise ValueError(f"density {density} selects no element of any parameter")
    return _prepared(patches)


# --------------------------------------------------------------------------------------------
# Inline patch
# --------------------------------------------------------------------------------------------


def apply_inline(model: torch.nn.Module, patches: Sequence[SparsePatch]) -> PreparedPatch:
    """Apply already-validated patches in place (``index_copy_`` on each parameter's flat view).

    Returned patches hold int32 indices and values cast to the parameter's dtype, on its device, so
    the digest describes exactly what was applied (and what a sparse sync sends).
    """
    out: list[SparsePatch] = []
    with torch.no_grad():
        for patch in patches:
            p = _get_param(model, patch.name)
            flat = _flat_view(p)
            indices = torch.as_tensor(patch.indices).to(device=p.device, dtype=torch.int32).reshape(-1)
            values = torch.as_tensor(patch.values).to(device=p.device, dtype=p.dtype).reshape(-1)
            flat.index_copy_(0, indices.long(), values)
            out.append(SparsePatch(name=patch.name, indices=indices, values=values))
    return _prepared(out)
