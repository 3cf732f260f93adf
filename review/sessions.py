"""Reader sessions: a random token in an HttpOnly cookie, its sha256 in the database.

A session ends after :data:`IDLE` without a request, at :data:`ABSOLUTE` after sign-in, at
sign-out, or when the reader's account is disabled. The token is 32 random bytes; the database
holds only its digest, so a copy of the database signs nobody in.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from radbridge.db.engine import Database
from radbridge.db.tables import ReaderSessionRow, utcnow
from review.readers import Reader, reader_by_id

__all__ = ["ABSOLUTE", "COOKIE", "IDLE", "end_session", "resolve_session", "start_session"]

COOKIE = "radbridge_reader"
IDLE = timedelta(minutes=30)
ABSOLUTE = timedelta(hours=12)
_TOUCH_EVERY = timedelta(seconds=30)  # last_seen_at is rewritten at most this often


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def start_session(db: Database, reader: Reader, now: datetime | None = None) -> str:
    """A new session for ``reader``; returns the token for the cookie."""
    now = now or utcnow()
    token = secrets.token_urlsafe(32)
    with db.session() as s:
        s.execute(delete(ReaderSessionRow).where(ReaderSessionRow.expires_at < now))
        s.add(
            ReaderSessionRow(
                token_sha256=_digest(token),
                reader_id=reader.id,
                created_at=now,
                last_seen_at=now,
                expires_at=now + ABSOLUTE,
            )
        )
    return token


def resolve_session(db: Database, token: str | None, now: datetime | None = None) -> Reader | None:
    """The reader of a live session, or None (unknown, idle too long, expired, disabled)."""
    if not token or len(token) > 128:
        return None
    now = now or utcnow()
    with db.session() as s:
        row = s.scalar(
            select(ReaderSessionRow).where(ReaderSessionRow.token_sha256 == _digest(token))
        )
        if row is None:
            return None
        if now >= row.expires_at or now - row.last_seen_at >= IDLE:
            s.delete(row)
            return None
        if now - row.last_seen_at >= _TOUCH_EVERY:
            row.last_seen_at = now
        reader_id = row.reader_id
    return reader_by_id(db, reader_id)


def end_session(db: Database, token: str | None) -> None:
    if token:
        with db.session() as s:
            s.execute(
                delete(ReaderSessionRow).where(ReaderSessionRow.token_sha256 == _digest(token))
            )
