"""Jobs, results and patch records in SQL (SQLite by default, any SQLAlchemy URL)."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String, Text, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from wsync.schemas import JobInfo, JobKind, JobState, PatchInfo, ResultInfo


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime | None) -> datetime | None:
    # SQLite drops tzinfo; everything we store is UTC.
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    request: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    result_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    events: Mapped[list] = mapped_column(JSON, default=list)


class ResultRow(Base):
    __tablename__ = "results"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    data: Mapped[dict] = mapped_column(JSON)


class PatchRow(Base):
    __tablename__ = "patches"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    info: Mapped[dict] = mapped_column(JSON)


def _job_info(row: JobRow) -> JobInfo:
    return JobInfo(
        id=row.id, kind=JobKind(row.kind), state=JobState(row.state),
        created_at=_aware(row.created_at), started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at), error=row.error, request=row.request or {},
        result=row.result, result_id=row.result_id, events=list(row.events or []),
    )


class Store:
    """Thread-safe facade over the database. Every method opens its own short session."""

    def __init__(self, url: str):
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self._session() as s:
            s.execute(select(1))

    # ---- jobs -------------------------------------------------------------------------
    def create_job(self, kind: JobKind, request: dict) -> JobInfo:
        row = JobRow(id=new_id("job"), kind=kind.value, state=JobState.queued.value,
                     created_at=_now(), request=_jsonable(request), events=[])
        with self._lock, self._session.begin() as s:
            s.add(row)
        return _job_info(row)

    def get_job(self, job_id: str) -> JobInfo | None:
        with self._session() as s:
            row = s.get(JobRow, job_id)
            return _job_info(row) if row else None

    def list_jobs(self, *, state: JobState | None = None, kind: JobKind | None = None,
                  limit: int = 50, offset: int = 0) -> tuple[list[JobInfo], int]:
        q = select(JobRow)
        if state:
            q = q.where(JobRow.state == state.value)
        if kind:
            q = q.where(JobRow.kind == kind.value)
        with self._session() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = s.scalars(q.order_by(JobRow.created_at.desc()).limit(limit).offset(offset)).all()
            return [_job_info(r) for r in rows], int(total or 0)

    def update_job(self, job_id: str, **fields: Any) -> JobInfo:
        with self._lock, self._session.begin() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise KeyError(job_id)
            for key, value in fields.items():
                if isinstance(value, JobState):
                    value = value.value
                setattr(row, key, _jsonable(value) if key == "result" else value)
            return _job_info(row)

    def add_event(self, job_id: str, message: str, **data: Any) -> None:
        with self._lock, self._session.begin() as s:
            row = s.get(JobRow, job_id)
            if row is not None:
                row.events = [*(row.events or []), {"at": _now().isoformat(), "message": message, **_jsonable(data)}]

    def fail_unfinished(self, reason: str) -> int:
        """Mark jobs a previous process left queued or running as failed; returns how many."""
        with self._lock, self._session.begin() as s:
            rows = s.scalars(select(JobRow).where(JobRow.state.in_([JobState.queued.value, JobState.running.value]))).all()
            for row in rows:
                row.state, row.error, row.finished_at = JobState.failed.value, reason, _now()
            return len(rows)

    # ---- results ----------------------------------------------------------------------
    def add_result(self, job_id: str, kind: JobKind, data: dict) -> ResultInfo:
        row = ResultRow(id=new_id("res"), job_id=job_id, kind=kind.value, created_at=_now(), data=_jsonable(data))
        with self._lock, self._session.begin() as s:
            s.add(row)
        return ResultInfo(id=row.id, job_id=job_id, kind=kind, created_at=row.created_at, data=row.data)

    def list_results(self, *, kind: JobKind | None = None, limit: int = 50, offset: int = 0) -> tuple[list[ResultInfo], int]:
        q = select(ResultRow)
        if kind:
            q = q.where(ResultRow.kind == kind.value)
        with self._session() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = s.scalars(q.order_by(ResultRow.seq.desc()).limit(limit).offset(offset)).all()
            return [_result_info(r) for r in rows], int(total or 0)

    def get_result(self, result_id: str) -> ResultInfo | None:
        with self._session() as s:
            row = s.scalar(select(ResultRow).where(ResultRow.id == result_id))
            return _result_info(row) if row else None

    # ---- patches ----------------------------------------------------------------------
    def add_patch(self, info: PatchInfo) -> None:
        with self._lock, self._session.begin() as s:
            s.add(PatchRow(id=info.id, created_at=info.created_at, info=info.model_dump(mode="json")))

    def get_patch(self, patch_id: str) -> PatchInfo | None:
        with self._session() as s:
            row = s.scalar(select(PatchRow).where(PatchRow.id == patch_id))
            return PatchInfo.model_validate(row.info) if row else None

    def list_patches(self, *, limit: int = 50, offset: int = 0) -> tuple[list[PatchInfo], int]:
        with self._session() as s:
            total = s.scalar(select(func.count()).select_from(PatchRow))
            rows = s.scalars(select(PatchRow).order_by(PatchRow.seq.desc()).limit(limit).offset(offset)).all()
            return [PatchInfo.model_validate(r.info) for r in rows], int(total or 0)


def _result_info(row: ResultRow) -> ResultInfo:
    return ResultInfo(id=row.id, job_id=row.job_id, kind=JobKind(row.kind), created_at=_aware(row.created_at), data=row.data)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _jsonable(value: Any) -> Any:
    if value is None:
        return None
    return json.loads(json.dumps(value, default=str))
