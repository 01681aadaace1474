"""The sparse encoding names on the API: gap / gap8, with the old delta / delta8 spellings mapped."""

from datetime import UTC

import pytest
from pydantic import ValidationError

from wsync.schemas import SparseEncoding, SyncSparse
from wsync.transfer.encodings import ENCODINGS


def test_api_names_match_the_wire_encodings() -> None:
    assert {e.value for e in SparseEncoding} == set(ENCODINGS)


@pytest.mark.parametrize(("old", "new"), [("delta", "gap"), ("delta8", "gap8"), ("gap", "gap")])
def test_deprecated_spellings_map_to_gap_encodings(old: str, new: str) -> None:
    body = SyncSparse(engine_ids=["e-1"], patch_id="p-1", encoding=old)
    assert body.encoding == SparseEncoding(new)


def test_unknown_encoding_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as e:
        SyncSparse(engine_ids=["e-1"], patch_id="p-1", encoding="delta16")
    assert e.value.errors()[0]["loc"] == ("encoding",)


def test_timestamps_serialize_in_one_utc_format() -> None:
    from datetime import datetime, timedelta, timezone

    from wsync.schemas import JobInfo, iso_utc, utcnow

    assert utcnow().tzinfo == UTC
    plus2 = datetime(2026, 12, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    naive = datetime(2026, 12, 1, 10, 0, 0, 5)  # as SQLite hands them back: taken as UTC
    assert iso_utc(plus2) == iso_utc(naive) == "2026-12-01T10:00:00.000005Z"
    job = JobInfo.model_validate({"id": "j-1", "kind": "sync_dense", "state": "queued", "created_at": plus2})
    assert job.created_at == naive.replace(tzinfo=UTC)
    assert job.model_dump(mode="json")["created_at"] == "2026-12-01T10:00:00.000005Z"
