"""Database fixtures: every store test runs on SQLite and, when reachable, on the local PostgreSQL.

``WSYNC_TEST_PG_URL`` overrides the PostgreSQL URL (default: trust auth on 127.0.0.1:5432, db ``test``).
Each PostgreSQL test gets its own schema (dropped afterwards), so runs never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from functools import lru_cache

import pytest

PG_URL = os.environ.get("WSYNC_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@lru_cache
def pg_unavailable() -> str | None:
    """None when PostgreSQL answers, else why not (the skip reason)."""
    try:
        import psycopg  # noqa: F401
        from sqlalchemy import create_engine, text
    except ImportError as exc:
        return f"psycopg not installed ({exc}); pip install -e '.[postgres]'"
    try:
        eng = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            conn.execute(text("select 1"))
        eng.dispose()
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def pg_schema_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


def _pg_exec(sql: str) -> None:
    from sqlalchemy import create_engine, text

    eng = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text(sql))
    eng.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty database URL per test, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'wsync.db'}"
        return
    reason = pg_unavailable()
    if reason:
        pytest.skip(reason)
    schema = f"wsync_test_{uuid.uuid4().hex[:12]}"
    _pg_exec(f'CREATE SCHEMA "{schema}"')
    try:
        yield pg_schema_url(schema)
    finally:
        _pg_exec(f'DROP SCHEMA "{schema}" CASCADE')
