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
    gpus = _cuda_gpus()
    skip = pytest.mark.skip(reason="needs 2 CUDA GPUs (run on the GPU machine: scripts/gpu-check)")
    skip1 = pytest.mark.skip(reason="needs one CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu1") is not None:  # one-GPU tests (keywords also hold "gpu", the folder)
            if gpus < 1:
                item.add_marker(skip1)
        elif "gpu" in item.keywords and gpus < 2:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def report_dir(tmp_path_factory) -> Path:
    d = os.environ.get("WSYNC_GPU_REPORT_DIR")
    path = Path(d) if d else tmp_path_factory.mktemp("gpu-report")
    path.mkdir(parents=True, exist_ok=True)
    return path
