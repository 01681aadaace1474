"""Shared pieces of the GPU story tests (tests/gpu/test_1..3 run in that order)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERDICTS = ["baseline_equal", "patch_selection_equal", "patch_digest_equal", "after_equal", "any_output_changed"]


def example_path() -> Path:
    for p in (os.environ.get("WSYNC_REFERENCE_EXAMPLE"), ROOT / ".gpu/rlhf_sparse_nccl.py"):
        if p and Path(p).is_file():
            return Path(p)
    pytest.skip("vLLM's rlhf_sparse_nccl.py not found (set WSYNC_REFERENCE_EXAMPLE)")
