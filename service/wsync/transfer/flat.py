"""Parameters laid out back to back in the dense wire's bucket order, so a dense sync sends from (and
receives into) their own storage: no pack or unpack copy, one broadcast per bucket.

`flatten_params` moves each parameter's data into one uint8 buffer per bucket of
`dense.plan_buckets(param_metas(params), bucket_bytes)` and repoints the parameter at its slice
(`param.data = view`), as flat-parameter trainers do. Tied parameters stay tied (they are one object).
A bucket whose offsets would misalign a dtype is left as it is (syncs still work, with a copy)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .dense import plan_buckets
from .meta import param_metas


def flatten_params(params: Mapping[str, torch.Tensor], bucket_bytes: int) -> int:
    """Re-home ``params`` into per-bucket flat buffers; returns how many buckets were flattened."""
    names = list(params)
    metas = param_metas((n, params[n]) for n in names)
    done = 0
    with torch.no_grad():
        for bucket in plan_buckets(metas, bucket_bytes):
            tensors = [params[names[i]] for i in bucket]
            offsets, total = [], 0
            for t in tensors:
                if total % t.element_size():
                    break
                offsets.append(total)
                total += t.numel() * t.element_size()
            devices = {t.device for t in tensors}
            if len(offsets) != len(tensors) or len(devices) != 1 or len(bucket) < 2:
                continue  # misaligned, spread over devices, or a lone tensor (already direct)
            buf = torch.empty(total, dtype=torch.uint8, device=devices.pop())
            for t, off in zip(tensors, offsets):
                n = t.numel() * t.element_size()
                view = buf[off:off + n].view(t.dtype).view(t.shape)
                view.copy_(t.detach())
                t.data = view
            done += 1
    return done


def flatten_by_dtype(named: list[tuple[str, torch.Tensor]], align_bytes: int = 512) -> dict:
    """Re-home every parameter into ONE flat buffer per dtype (in the given order, each start aligned to
    `align_bytes` like the caching allocator's blocks) and repoint it there (`param.data = view`): the
    same move as `flatten_params`, grouped by dtype instead of by bucket, so that a sparse apply is one
    scatter per dtype (`ipc_flat.apply_flat`). Tied parameters must be passed once (the same object
    twice is skipped). Checked first, nothing moved when it fails: every parameter contiguous, on one
    device, the sole user of its storage (it spans all of it) - else {"flattened": False, "reason": ...}.
    Already one storage per dtype: {"flattened": True, "already": True}. The originals are released when
    nothing else references them (the caller empties its allocator cache). Peak memory: one extra copy of
    the parameters while copying."""
    seen, params = set(), []
    for name, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            params.append((name, p))
    devices = set()
    for name, p in params:
        if not p.data.is_contiguous():
            return {"flattened": False, "reason": f"{name} is not contiguous"}
        devices.add(p.device)
    if len(devices) > 1:
        return {"flattened": False, "reason": f"parameters on several devices {sorted(map(str, devices))}"}
    groups: dict[torch.dtype, list] = {}
    for name, p in params:
        groups.setdefault(p.dtype, []).append((name, p))
    if all(len({p.data.untyped_storage().data_ptr() for _, p in g if p.numel()}) <= 1 for g in groups.values()):
        return {"flattened": True, "already": True, "dtypes": len(groups), "params": len(params)}
    ptrs: dict[int, str] = {}
    for name, p in params:  # each the sole user of its storage: nothing else may alias what we move
        if p.numel() == 0:
            continue
        st = p.data.untyped_storage()
        if st.data_ptr() in ptrs:
            return {"flattened": False, "reason": f"{name} shares its storage with {ptrs[st.data_ptr()]}"}
        if st.nbytes() != p.numel() * p.element_size():
            return {"flattened": False, "reason": f"{name} does not span its storage (a view of a larger one)"}
        ptrs[st.data_ptr()] = name
    total_bytes, device = 0, devices.pop() if devices else torch.device("cpu")
    with torch.no_grad():
        for dtype, group in groups.items():
            size = torch.empty(0, dtype=dtype).element_size()
            step = max(1, align_bytes // size)
            offs, n = [], 0
            for _, p in group:
                offs.append(n)
                n += -(-p.numel() // step) * step
            flat = torch.empty(n, dtype=dtype, device=device) if n else None
            for (_, p), off in zip(group, offs):
                if flat is None or p.numel() == 0:
                    continue
                view = flat[off:off + p.numel()].view(p.shape)
                view.copy_(p.data)
                p.data = view
            total_bytes += n * size
    return {"flattened": True, "already": False, "dtypes": len(groups), "params": len(params), "bytes": total_bytes}
