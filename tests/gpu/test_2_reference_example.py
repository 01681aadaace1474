"""(c) vLLM's own rlhf_sparse_nccl.py, unchanged but for MODEL_NAME = the generated model."""

import json
import subprocess
import sys

import pytest

from .story import ROOT, VERDICTS, example_path

pytestmark = pytest.mark.gpu


def test_c_reference_example(report_dir):
    from wsync.models.tiny import ensure_default_model

    out = report_dir / "reference_example.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/run_reference_example.py"), "--example",
                           str(example_path()), "--model", str(ensure_default_model()), "--out", str(out)],
                          timeout=900, capture_output=True, text=True)
    log = proc.stdout[-200000:] + "\n--- stderr ---\n" + proc.stderr[-200000:]
    (report_dir / "reference_example.log").write_text(log)
    assert out.exists(), proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["error"] is None, res["error"]
    assert all(res["verdicts"][k] for k in VERDICTS), res["verdicts"]
