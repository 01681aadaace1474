"""Human-readable text of a ComparisonReport, in the style of vLLM's rlhf_sparse_nccl.py output."""

from __future__ import annotations

from collections.abc import Sequence

from wsync.schemas import ComparisonReport, PhaseReport

__all__ = ["format_report", "failed_verdicts", "passed"]

_RULE = "-" * 50
_MB = 1024 * 1024


def failed_verdicts(report: ComparisonReport) -> list[str]:
    """Names of the verdicts that are false (in the order the model declares them)."""
    return [name for name, value in report.verdicts.model_dump().items() if not value]


def passed(report: ComparisonReport) -> bool:
    return not failed_verdicts(report)


def _outputs(label: str, prompts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> list[str]:
    lines = ["", label, _RULE]
    for i, ids in enumerate(token_ids):
        prompt = prompts[i] if i < len(prompts) else f"<prompt {i}>"
        lines += [f"Prompt: {prompt!r}", f"Token IDs: {list(ids)}", _RULE]
    return lines


def _ratio_line(dense: PhaseReport, sparse: PhaseReport) -> str:
    if dense.payload_bytes <= 0:
        return "sparse/dense payload ratio = n/a"
    ratio = sparse.payload_bytes / dense.payload_bytes
    smaller = f" ({dense.payload_bytes / sparse.payload_bytes:.1f}x smaller)" if sparse.payload_bytes > 0 else ""
    return f"sparse/dense payload ratio = {ratio:.4f}{smaller}"


def format_report(report: ComparisonReport) -> str:
    """Per-phase outputs (before/after for the dense and the sparse engine, and the trainer's), then
    the `name = value` summary lines and a final `RESULT: PASS` / `RESULT: FAIL (<failed verdicts>)`."""
    d, s, v = report.dense, report.sparse, report.verdicts
    kind = getattr(report.engine_kind, "value", report.engine_kind)
    lines = [f"wsync dense vs sparse comparison: model={report.model} engine_kind={kind}",
             f"dense engine = {d.engine_id}, sparse engine = {s.engine_id}"]
    lines += _outputs("Trainer baseline outputs", report.prompts, d.trainer_before)
    lines += _outputs("Dense baseline outputs", report.prompts, d.before)
    lines += _outputs("Sparse baseline outputs", report.prompts, s.before)
    lines += _outputs("Trainer outputs after patch", report.prompts, d.trainer_after)
    lines += _outputs("Dense outputs after update", report.prompts, d.after)
    lines += _outputs("Sparse outputs after update", report.prompts, s.after)
    lines += [
        "",
        f"patched_token_ids = {d.selected_token_ids}",
        f"patch_selection_equal = {v.patch_selection_equal}",
        f"dense_patch_digest = {d.patch_digest}",
        f"sparse_patch_digest = {s.patch_digest}",
        f"patch_digest_equal = {v.patch_digest_equal}",
        f"baseline_equal = {v.baseline_equal}",
        f"after_equal = {v.after_equal}",
        f"any_output_changed = {v.any_output_changed}",
        f"trainer_engine_baseline_equal = {report.trainer_engine_baseline_equal}",
        f"dense_payload_mb = {report.dense_payload_mb:.2f}",
        f"sparse_payload_mb = {report.sparse_payload_mb:.2f}",
        f"dense_send_ms = {report.dense_send_ms:.2f}",
        f"sparse_send_ms = {report.sparse_send_ms:.2f}",
        f"dense_wire_mb = {d.wire_bytes / _MB:.2f}",
        f"sparse_wire_mb = {s.wire_bytes / _MB:.2f}",
        _ratio_line(d, s),
    ]
    if d.verified is not None or s.verified is not None:
        lines.append(f"fingerprints_verified = dense:{d.verified} sparse:{s.verified}")
    failed = failed_verdicts(report)
    lines.append("RESULT: PASS" if not failed else f"RESULT: FAIL ({', '.join(failed)})")
    return "\n".join(lines)
