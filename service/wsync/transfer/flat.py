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
