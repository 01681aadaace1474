"""The service's payloads equal vLLM's example's to the byte, and the verdicts agree."""

import json

import pytest

from .story import VERDICTS

pytestmark = pytest.mark.gpu


def test_payloads_match_reference_example(report_dir):
    ref = json.loads((report_dir / "reference_example.json").read_text())
    svc = json.loads((report_dir / "service_vllm.json").read_text())
    assert svc["dense"]["payload_bytes"] == ref["dense_payload_bytes"]
    assert svc["sparse"]["payload_bytes"] == ref["sparse_payload_bytes"]
    assert svc["dense"]["selected_token_ids"] == ref["selected_token_ids"]
    assert svc["dense"]["patch_digest"] == ref["patch_digest"]
    assert {k: svc["verdicts"][k] for k in VERDICTS} == ref["verdicts"]
