#!/usr/bin/env python3
"""Run vLLM's rlhf_sparse_nccl.py example unchanged but for MODEL_NAME, and write its figures as JSON.

    python scripts/run_reference_example.py --example PATH --model MODEL --out reference.json

The example keeps its results in module globals (dense_results, sparse_results and the verdicts); they
are read back after it ran, so payload bytes come out exact rather than as the MB it prints."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback

VERDICTS = ("baseline_equal", "patch_selection_equal", "patch_digest_equal", "after_equal", "any_output_changed")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--example", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    src = open(args.example).read()
    src, n = re.subn(r'^MODEL_NAME = .*$', f"MODEL_NAME = {args.model!r}", src, count=1, flags=re.M)
    if n != 1:
        raise SystemExit("MODEL_NAME assignment not found in the example")
    ns: dict = {"__name__": "__main__", "__file__": args.example}
    t0, error = time.time(), None
    try:
        exec(compile(src, args.example, "exec"), ns)
    except BaseException as exc:  # the example raises on a false verdict; keep what it measured
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    dense, sparse = ns.get("dense_results") or {}, ns.get("sparse_results") or {}
    out = {
        "model": args.model,
        "wall_s": round(time.time() - t0, 1),
        "error": error,
        "verdicts": {k: ns.get(k) for k in VERDICTS},
        "dense_payload_bytes": dense.get("dense_payload_bytes"),
        "sparse_payload_bytes": sparse.get("sparse_payload_bytes"),
        "dense_payload_mb": ns.get("dense_payload_mb"),
        "sparse_payload_mb": ns.get("sparse_payload_mb"),
        "dense_send_ms": dense.get("dense_send_ms"),
        "sparse_send_ms": sparse.get("sparse_send_ms"),
        "selected_token_ids": dense.get("selected_token_ids"),
        "patch_digest": dense.get("patch_digest"),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(json.dumps(out, indent=2, default=str))
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
