"""Idempotency keys in the database: a POST that carries ``Idempotency-Key`` is done once; a retry with
the same key and the same request gets the first answer back (wsync.api.idempotency).

A row is ``pending`` while the first request runs and ``done`` with its status and body after; rows
older than ``ttl_s`` are forgotten. ``claim`` is atomic (the key is the primary key), so two retries
racing each other cannot both do the work."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import DateTime, Integer, String, Text, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

DEFAULT_TTL_S = 24 * 3600.0


class _Base(DeclarativeBase):
    pass


class KeyRow(_Base):
    __tablename__ = "idempotency_keys"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # pending | done
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    body: Mapped[str | None] = mapped_column(Text, nullable=True)
    content_type: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Stored:
    request_hash: str
    state: str
    status: int | None = None
    body: str | None = None
    content_type: str | None = None


class IdempotencyKeys:
    def __init__(self, engine: Engine, ttl_s: float = DEFAULT_TTL_S):
        _Base.metadata.create_all(engine)
        self._session = sessionmaker(engine, expire_on_commit=False)
        self.ttl_s = ttl_s

    def claim(self, key: str, request_hash: str) -> Stored | None:
        """Take ``key`` for this request (None: ours now, go ahead) or return what is stored under it."""
        now = datetime.now(UTC)
        with self._session.begin() as s:
            s.execute(delete(KeyRow).where(KeyRow.created_at < now - timedelta(seconds=self.ttl_s)))
        try:
            with self._session.begin() as s:
                s.add(KeyRow(key=key, request_hash=request_hash, state="pending", created_at=now))
            return None
        except IntegrityError:
            with self._session() as s:
                row = s.scalar(select(KeyRow).where(KeyRow.key == key))
            if row is None:  # expired and deleted in between: try once more
                return self.claim(key, request_hash)
            return Stored(row.request_hash, row.state, row.status, row.body, row.content_type)

    def finish(self, key: str, status: int, body: str, content_type: str | None) -> None:
        with self._session.begin() as s:
            row = s.get(KeyRow, key)
            if row is not None:
                row.state, row.status, row.body, row.content_type = "done", status, body, content_type

    def release(self, key: str) -> None:
        """Forget a claim whose request should be retried for real (a transient failure)."""
        with self._session.begin() as s:
            s.execute(delete(KeyRow).where(KeyRow.key == key))
