import os
from pathlib import Path

import pytest


def _cuda_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def pytest_collection_modifyitems(config, items):
    if _cuda_gpus() >= 2:
        return
    skip = pytest.mark.skip(reason="needs 2 CUDA GPUs (run on the GPU machine: scripts/gpu-check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def report_dir(tmp_path_factory) -> Path:
    d = os.environ.get("WSYNC_GPU_REPORT_DIR")
    path = Path(d) if d else tmp_path_factory.mktemp("gpu-report")
    path.mkdir(parents=True, exist_ok=True)
    return path
