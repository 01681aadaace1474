"""The sparse encoding names on the API: gap / gap8, with the old delta / delta8 spellings mapped."""

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
