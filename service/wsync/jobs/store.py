"""Jobs, results and patch records in SQL (SQLite by default, any SQLAlchemy URL)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String, Text, create_engine, delete, event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from wsync.errors import InvalidInput
from wsync.schemas import JobInfo, JobKind, JobState, PatchInfo, ResultInfo

#: Largest page offset any list accepts (the API refuses more with a 422 naming ``offset``); SQLite
#: and PostgreSQL take 64-bit signed offsets and overflowed at 2**63.
MAX_OFFSET = 2**31 - 1


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


class LeaseRow(Base):
    """One row per lease name: which service process owns the database, until when."""

    __tablename__ = "instance_lease"
    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(300))
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class LeaseInfo:
    name: str
    owner: str
    address: str
    acquired_at: datetime
    heartbeat_at: datetime
    expires_at: datetime


def _job_info(row: JobRow) -> JobInfo:
    return JobInfo(
        id=row.id, kind=JobKind(row.kind), state=JobState(row.state),
        created_at=_aware(row.created_at), started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at), error=row.error, request=row.request or {},
        result=row.result, result_id=row.result_id, events=list(row.events or []),
    )


class Store:
    """Thread-safe facade over the database. Every method opens its own short session.

    Several Store instances (threads, or processes that lost the instance lease race) may write the
    same database: job state changes are conditional single UPDATEs (``transition``) so a job's
    state machine cannot be broken by a concurrent writer, and read-modify-write paths lock the row
    (``SELECT … FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite).
    """

    def __init__(self, url: str):
        self.url = url
        self.sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, **kwargs)
        self._wengine = create_engine(url, **kwargs) if self.sqlite else self.engine
        if self.sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self._wengine, "connect", _sqlite_write_connect)
            event.listen(self._wengine, "begin", _sqlite_begin_immediate)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self._wengine, expire_on_commit=False)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()
        self._wengine.dispose()

    def ping(self) -> None:
        with self._session() as s:
            s.execute(select(1))

    # ---- jobs -------------------------------------------------------------------------
    def create_job(self, kind: JobKind, request: dict) -> JobInfo:
        row = JobRow(id=new_id("job"), kind=kind.value, state=JobState.queued.value,
                     created_at=_now(), request=_jsonable(request), events=[])
        with self._lock, self._write.begin() as s:
            s.add(row)
        return _job_info(row)

    def get_job(self, job_id: str) -> JobInfo | None:
        with self._session() as s:
            row = s.get(JobRow, job_id)
            return _job_info(row) if row else None

    def list_jobs(self, *, state: JobState | None = None, kind: JobKind | None = None,
                  limit: int = 50, offset: int = 0) -> tuple[list[JobInfo], int]:
        _check_page(limit, offset)
        q = select(JobRow)
        if state:
            q = q.where(JobRow.state == state.value)
        if kind:
            q = q.where(JobRow.kind == kind.value)
        with self._session() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = s.scalars(q.order_by(JobRow.created_at.desc()).limit(limit).offset(offset)).all()
            return [_job_info(r) for r in rows], int(total or 0)

    def transition(self, job_id: str, from_states: Iterable[JobState], to: JobState, **fields: Any) -> JobInfo | None:
        """Move a job to ``to`` only if it is in one of ``from_states`` (one conditional UPDATE).

        Returns the updated job, or None when it was not in those states (someone else moved it).
        """
        values = {k: (_jsonable(v) if k == "result" else v) for k, v in fields.items()}
        values["state"] = to.value
        stmt = (update(JobRow).where(JobRow.id == job_id, JobRow.state.in_([st.value for st in from_states]))
                .values(**values).execution_options(synchronize_session=False))
        with self._lock, self._write.begin() as s:
            changed = s.execute(stmt).rowcount
        return self.get_job(job_id) if changed else None

    def update_job(self, job_id: str, **fields: Any) -> JobInfo:
        """Unconditional update (tests, repairs); state changes should use ``transition``."""
        with self._lock, self._write.begin() as s:
            row = s.get(JobRow, job_id, with_for_update=not self.sqlite)
            if row is None:
                raise KeyError(job_id)
            for key, value in fields.items():
                if isinstance(value, JobState):
                    value = value.value
                setattr(row, key, _jsonable(value) if key == "result" else value)
            return _job_info(row)

    def add_event(self, job_id: str, message: str, **data: Any) -> None:
        with self._lock, self._write.begin() as s:
            row = s.get(JobRow, job_id, with_for_update=not self.sqlite)
            if row is not None:
                row.events = [*(row.events or []), {"at": _now().isoformat(), "message": message, **_jsonable(data)}]

    def interrupt_unfinished(self) -> int:
        """Mark jobs a previous process left queued or running as ``interrupted`` (now); returns how many.

        Call only while holding the instance lease: a live server's jobs would be marked too.
        """
        at = _now()
        stmt = (update(JobRow).where(JobRow.state.in_([JobState.queued.value, JobState.running.value]))
                .values(state=JobState.interrupted.value, finished_at=at,
                        error=f"interrupted: the service stopped before this job finished (seen at restart {at.isoformat()})")
                .execution_options(synchronize_session=False))
        with self._lock, self._write.begin() as s:
            return int(s.execute(stmt).rowcount or 0)

    # ---- instance lease ---------------------------------------------------------------
    def acquire_lease(self, owner: str, address: str, ttl_s: float, name: str = "service") -> LeaseInfo | None:
        """Take the lease if free, expired, or already ours; else return the live holder (and take nothing)."""
        now = _now()
        expires = now + timedelta(seconds=ttl_s)
        stmt = (update(LeaseRow).where(LeaseRow.name == name, (LeaseRow.owner == owner) | (LeaseRow.expires_at < now))
                .values(owner=owner, address=address, acquired_at=now, heartbeat_at=now, expires_at=expires)
                .execution_options(synchronize_session=False))
        with self._lock:
            with self._write.begin() as s:
                if s.execute(stmt).rowcount:
                    return None
            try:
                with self._write.begin() as s:
                    s.add(LeaseRow(name=name, owner=owner, address=address, acquired_at=now,
                                   heartbeat_at=now, expires_at=expires))
                return None
            except IntegrityError:
                pass
        holder = self.get_lease(name)
        if holder is None:  # released between our two statements: try once more
            return self.acquire_lease(owner, address, ttl_s, name)
        return holder

    def renew_lease(self, owner: str, ttl_s: float, name: str = "service") -> bool:
        """Extend our lease; False when we no longer hold it (expired and taken over)."""
        now = _now()
        stmt = (update(LeaseRow).where(LeaseRow.name == name, LeaseRow.owner == owner)
                .values(heartbeat_at=now, expires_at=now + timedelta(seconds=ttl_s))
                .execution_options(synchronize_session=False))
        with self._lock, self._write.begin() as s:
            return bool(s.execute(stmt).rowcount)

    def release_lease(self, owner: str, name: str = "service") -> None:
        with self._lock, self._write.begin() as s:
            s.execute(delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.owner == owner))

    def get_lease(self, name: str = "service") -> LeaseInfo | None:
        with self._session() as s:
            row = s.get(LeaseRow, name)
            if row is None:
                return None
            return LeaseInfo(row.name, row.owner, row.address, _aware(row.acquired_at),
                             _aware(row.heartbeat_at), _aware(row.expires_at))

    # ---- results ----------------------------------------------------------------------
    def add_result(self, job_id: str, kind: JobKind, data: dict) -> ResultInfo:
        row = ResultRow(id=new_id("res"), job_id=job_id, kind=kind.value, created_at=_now(), data=_jsonable(data))
        with self._lock, self._write.begin() as s:
            s.add(row)
        return ResultInfo(id=row.id, job_id=job_id, kind=kind, created_at=row.created_at, data=row.data)

    def list_results(self, *, kind: JobKind | None = None, limit: int = 50, offset: int = 0) -> tuple[list[ResultInfo], int]:
        _check_page(limit, offset)
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
        with self._lock, self._write.begin() as s:
            s.add(PatchRow(id=info.id, created_at=info.created_at, info=info.model_dump(mode="json")))

    def get_patch(self, patch_id: str) -> PatchInfo | None:
        with self._session() as s:
            row = s.scalar(select(PatchRow).where(PatchRow.id == patch_id))
            return PatchInfo.model_validate(row.info) if row else None

    def list_patches(self, *, limit: int = 50, offset: int = 0) -> tuple[list[PatchInfo], int]:
        _check_page(limit, offset)
        with self._session() as s:
            total = s.scalar(select(func.count()).select_from(PatchRow))
            rows = s.scalars(select(PatchRow).order_by(PatchRow.seq.desc()).limit(limit).offset(offset)).all()
            return [PatchInfo.model_validate(r.info) for r in rows], int(total or 0)


def _result_info(row: ResultRow) -> ResultInfo:
    return ResultInfo(id=row.id, job_id=row.job_id, kind=JobKind(row.kind), created_at=_aware(row.created_at), data=row.data)


def _check_page(limit: int, offset: int) -> None:
    if not 0 <= offset <= MAX_OFFSET:
        raise InvalidInput(f"offset must be between 0 and {MAX_OFFSET}", field="offset", rule="max_offset")
    if limit < 0 or limit > MAX_OFFSET:
        raise InvalidInput(f"limit must be between 0 and {MAX_OFFSET}", field="limit", rule="max_limit")


def _sqlite_write_connect(dbapi_conn, record) -> None:
    """Write connections: let SQLAlchemy emit BEGIN (see ``_sqlite_begin_immediate``)."""
    dbapi_conn.isolation_level = None
    _sqlite_pragmas(dbapi_conn, record)


def _sqlite_begin_immediate(conn) -> None:
    """Take SQLite's write lock at BEGIN so read-modify-write transactions cannot lose updates."""
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _jsonable(value: Any) -> Any:
    if value is None:
        return None
    return json.loads(json.dumps(value, default=str))
