"""The GPU-memory check a vLLM engine runs before ``LLM()`` (engines/vllm/engine.py)."""

from __future__ import annotations

import time

GIB = 1 << 30


class VLLMMemoryError(RuntimeError):
    """The GPU has less free memory than the engine's gpu_memory_utilization asks for."""


def check_gpu_memory(utilization: float, colocated: bool, settle_s: float = 15.0) -> None:
    """Refuse to start vLLM when the GPU has less free memory than ``utilization`` of it (vLLM's own
    start-up check, made early and clear: what it needs, what is free). Colocated, first wait (at most
    ``settle_s``) for free memory to settle: a just-deleted engine on this GPU may still be releasing
    memory, and vLLM's profiling fails when free memory grows under it."""
    import torch

    if not torch.cuda.is_available():
        return  # nothing to measure here (vLLM reports its own device error)
    free, total = torch.cuda.mem_get_info()
    deadline, stable = time.monotonic() + (settle_s if colocated else 0.0), 0
    while time.monotonic() < deadline and stable < 3:  # three quiet samples, 0.5 s apart
        time.sleep(0.5)
        now, _ = torch.cuda.mem_get_info()
        stable = stable + 1 if abs(now - free) < 256 * (1 << 20) else 0
        free = now
    need = utilization * total
    holders = "the colocated trainer and other engines" if colocated else "other processes"
    if free < need:
        raise VLLMMemoryError(
            f"gpu_memory_utilization {utilization:g} needs {need / GIB:.1f} GiB of this GPU's {total / GIB:.1f} GiB, "
            f"but only {free / GIB:.1f} GiB is free ({holders} hold the rest); "
            f"use gpu_memory_utilization <= {int(free / total * 100) / 100:g}")
