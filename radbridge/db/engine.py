"""Engine and session factory: SQLite (WAL, foreign keys) by default, PostgreSQL by URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Database", "create_db_engine", "normalize_url"]


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def create_db_engine(url: str) -> Engine:
    url = normalize_url(url)
    parsed = make_url(url)
    # A server connection can go stale (restart, idle timeout); a local SQLite file cannot,
    # and the ping would cost a round trip on every C-STORE.
    # hide_parameters: a failed statement's error (and any log of it) names no bound value;
    # at the edge those are patients' names, IDs and UIDs.
    kwargs: dict[str, Any] = {
        "pool_pre_ping": parsed.get_backend_name() != "sqlite",
        "hide_parameters": True,
    }
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class Database:
    """An engine plus a session factory; ``with db.session() as s:`` commits on success."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.engine = create_db_engine(self.url)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        s = self._factory()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def insert_once(self, row: Any) -> None:
        """Insert ``row`` unless one with its primary key exists. Another process may insert
        it at the same moment: its IntegrityError then means the row is there, as wanted."""
        mapper = inspect(type(row))
        key = tuple(getattr(row, c.key) for c in mapper.primary_key)
        with self.session() as s:
            if s.get(type(row), key) is not None:
                return
        try:
            with self.session() as s:
                s.add(row)
        except IntegrityError:
            pass

    def insert_or_skip(self, table: Any, unique: list[str]) -> Any:
        """``INSERT ... ON CONFLICT (unique) DO NOTHING`` for ``table`` in this database's
        dialect (SQLite and PostgreSQL spell it alike, from different modules)."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table).on_conflict_do_nothing(index_elements=unique)

    def dispose(self) -> None:
        self.engine.dispose()
