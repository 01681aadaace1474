"""The communicator surface shared by the trainer side and the worker extension: vLLM's
PyNcclCommunicator (`broadcast(tensor, src, stream)`), found inside vLLM's engines, and the stream /
device-sync helpers around it."""

from __future__ import annotations

import torch

_COMM_ATTRS = ("model_update_group", "communicator", "_communicator", "comm", "_comm")


def communicator_of(obj):
    """The PyNcclCommunicator inside a vLLM worker/trainer engine (attribute names vary by version), or None."""
    found = (getattr(obj, a, None) for a in _COMM_ATTRS)
    return next((c for c in found if hasattr(c, "broadcast")), None)


def device_sync() -> None:
    if torch.cuda.is_available():
        torch.accelerator.synchronize() if hasattr(torch, "accelerator") else torch.cuda.synchronize()


def current_stream():
    return torch.cuda.current_stream() if torch.cuda.is_available() else None
