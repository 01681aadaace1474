#!/usr/bin/env python3
"""Merge the GPU run's pieces into OUTDIR/gpu-report.json (used by scripts/gpu-check)."""

import datetime
import json
import subprocess
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except Exception as exc:  # a missing piece is reported, not fatal
        return {"missing": f"{path.name}: {exc}"}


def _gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
        return [ln.strip() for ln in out.splitlines() if ln.strip()]
    except Exception:
        return []


def _vllm_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("vllm")
    except Exception:
        return None


def _service(rep: dict) -> dict:
    if "verdicts" not in rep:
        return rep
    return {"verdicts": rep["verdicts"], "ok": rep["ok"],
            "trainer_engine_baseline_equal": rep["trainer_engine_baseline_equal"],
            "dense_payload_bytes": rep["dense"]["payload_bytes"],
            "sparse_payload_bytes": rep["sparse"]["payload_bytes"],
            "dense_send_ms": rep["dense_send_ms"], "sparse_send_ms": rep["sparse_send_ms"],
            "dense_total_ms": rep["dense"]["total_ms"], "sparse_total_ms": rep["sparse"]["total_ms"],
            "dense_verified": rep["dense"].get("verified"), "sparse_verified": rep["sparse"].get("verified")}


def main() -> None:
    out = Path(sys.argv[1])
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gpus": _gpus(), "vllm_version": _vllm_version(),
        "wall_s": int(sys.argv[2]) if len(sys.argv) > 2 else None,
        "pytest_exit_code": int(sys.argv[3]) if len(sys.argv) > 3 else None,
        "service_vllm": _service(_load(out / "service_vllm.json")),
        "service_reference_nccl": _service(_load(out / "service_reference.json")),
        "reference_example": _load(out / "reference_example.json"),
    }
    (out / "gpu-report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
