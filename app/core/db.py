"""Database engine, sessions and Alembic migrations (one code path for SQLite and PostgreSQL)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent.parent / "migrations"
_UNDO = "tuneforge_undo_on_rollback"
_AFTER_COMMIT = "tuneforge_after_commit"

log = logging.getLogger(__name__)
S = TypeVar("S", bound=Select[Any])

# A request waits this long for a pooled connection (all busy) before it is answered 503 database_unavailable.
POOL_TIMEOUT_SECONDS = 10


def undo_on_rollback(session: Session, action: Callable[[], None]) -> None:
    """Run `action` if the session's transaction is rolled back, to undo a side effect outside the database
    (an object already written to storage, say); forgotten once the transaction commits."""
    session.info.setdefault(_UNDO, []).append(action)


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run `action` once the session's transaction commits (a side effect outside the database that must not
    happen if the change is rolled back: deleting what the committed rows no longer name, say)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


@event.listens_for(Session, "after_commit")
def _run_after_commit_actions(session: Session) -> None:
    session.info.pop(_UNDO, None)
    for action in session.info.pop(_AFTER_COMMIT, []):
        try:
            action()
        except Exception:
            log.exception("could not finish a side effect of a committed transaction")


@event.listens_for(Session, "after_rollback")
def _run_undo_actions(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)
    for action in reversed(session.info.pop(_UNDO, [])):
        try:
            action()
        except Exception:
            log.exception("could not undo a side effect of a rolled-back transaction")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, pool_timeout=POOL_TIMEOUT_SECONDS, connect_args={"check_same_thread": False, "timeout": 30}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets the API read while the worker writes; foreign keys are off by default in SQLite.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # A database host that never answers fails a connection after 10 s instead of the OS's minutes.
    connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_timeout=POOL_TIMEOUT_SECONDS, connect_args=connect_args)


def lock_for_writing(session: Session) -> None:
    """On SQLite, take the database's write lock now, until the transaction ends: what a unit of work that checks
    and then writes (a limit, a quota, that a row is still there) does before its check, so that concurrent ones
    wait for it and see what it wrote, as PostgreSQL's row locks (SELECT ... FOR UPDATE, a no-op on SQLite) make
    them do there. Nothing on other databases.

    pysqlite runs reads outside a transaction and begins a deferred one at the first write, so the lock is taken
    with BEGIN IMMEDIATE unless a write already began one (which holds the lock already)."""
    connection = session.connection()
    if connection.dialect.name == "sqlite" and not connection.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def locked(session: Session, query: S, **kwargs: Any) -> S:
    """`query`, locking the rows it reads until the transaction ends: FOR UPDATE on PostgreSQL (`kwargs` as
    `with_for_update` takes them: read=True for a shared lock, key_share=True); SQLite has no row locks, so there
    the database's write lock is taken first (`lock_for_writing`)."""
    lock_for_writing(session)
    return query.with_for_update(**kwargs)


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    return make_engine(url)


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A unit of work: commit on success, roll back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema to `revision` (idempotent)."""
    from alembic import command

    if url.startswith("sqlite"):
        get_engine(url)  # creates the parent folder
    command.upgrade(alembic_config(url), revision)
