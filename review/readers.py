"""Reader accounts of a reading center: argon2id-hashed passwords, bound to agreements.

A reader belongs to one reading center and sees the agreements whose ``reading_center.name`` is
that center — narrowed to ``agreements`` when the account lists some. The embedded default keeps
accounts in the center's database (``radbridge readers add``); the design leaves room for an
OIDC provider in front (it would map a verified identity to the same :class:`Reader`).

What a signed report says about its reader is ``observer_id`` (an identifier such as
``RB-0001``) and a role: the minimum of the reader's personal data that returns to a hospital.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select

from radbridge.agreements import AgreementSet
from radbridge.db.engine import Database
from radbridge.db.tables import ReaderRow
from radbridge.errors import AuthError, ConfigError

__all__ = [
    "LOCALES",
    "Reader",
    "add_reader",
    "check_password",
    "list_readers",
    "reader_by_id",
    "set_active",
]

LOCALES = ("ru", "zh", "en")
MIN_PASSWORD = 12
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
_OBSERVER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,15}$")
_hasher = PasswordHasher()  # argon2id, the library's current defaults (RFC 9106)
# Verified against when the username is unknown, so both answers take argon2's time.
_DUMMY = _hasher.hash("radbridge-no-such-reader")


@dataclass(frozen=True)
class Reader:
    """A signed-in reader as the routes see them."""

    id: int
    username: str
    center: str
    agreements: frozenset[str]
    observer_id: str
    locale: str

    def visible(self, agreements: AgreementSet) -> frozenset[str]:
        """The agreements this reader may see: their center's, narrowed by their own list."""
        mine = {a.id for a in agreements.agreements if a.reading_center.name == self.center}
        return frozenset(mine & self.agreements) if self.agreements else frozenset(mine)


def _reader(row: ReaderRow) -> Reader:
    return Reader(
        row.id, row.username, row.center, frozenset(row.agreements), row.observer_id, row.locale
    )


def add_reader(
    db: Database,
    username: str,
    password: str,
    *,
    center: str,
    observer_id: str,
    agreements: list[str] | None = None,
    locale: str = "ru",
) -> Reader:
    """Create an account; :class:`ConfigError` names the field that is wrong."""
    if not _USERNAME.fullmatch(username):
        raise ConfigError("username: 2-64 of a-z 0-9 . _ - (starting with a letter or digit)")
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"password: at least {MIN_PASSWORD} characters")
    if not _OBSERVER.fullmatch(observer_id):
        raise ConfigError("observer_id: 1-16 of A-Z a-z 0-9 - (an identifier, not a name)")
    if locale not in LOCALES:
        raise ConfigError(f"locale: one of {', '.join(LOCALES)}")
    if not center.strip():
        raise ConfigError("center: the reading center's name as the agreements spell it")
    with db.session() as s:
        if s.scalar(select(ReaderRow.id).where(ReaderRow.username == username)) is not None:
            raise ConfigError(f"username: {username} exists")
        row = ReaderRow(
            username=username,
            center=center,
            agreements=sorted(set(agreements or [])),
            observer_id=observer_id,
            locale=locale,
            password_hash=_hasher.hash(password),
            active=True,
        )
        s.add(row)
        s.flush()
        return _reader(row)


def check_password(db: Database, username: str, password: str) -> Reader:
    """The active reader with these credentials, else :class:`AuthError` (one message)."""
    with db.session() as s:
        row = s.scalar(select(ReaderRow).where(ReaderRow.username == username))
        stored = row.password_hash if row is not None and row.active else _DUMMY
        try:
            _hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            raise AuthError("unknown username or wrong password") from None
        if row is None or not row.active:
            raise AuthError("unknown username or wrong password")
        if _hasher.check_needs_rehash(row.password_hash):
            row.password_hash = _hasher.hash(password)
        return _reader(row)


def reader_by_id(db: Database, reader_id: int) -> Reader | None:
    with db.session() as s:
        row = s.get(ReaderRow, reader_id)
        return _reader(row) if row is not None and row.active else None


def list_readers(db: Database) -> list[tuple[Reader, bool]]:
    with db.session() as s:
        rows = s.scalars(select(ReaderRow).order_by(ReaderRow.username)).all()
        return [(_reader(r), r.active) for r in rows]


def set_active(db: Database, username: str, active: bool) -> None:
    with db.session() as s:
        row = s.scalar(select(ReaderRow).where(ReaderRow.username == username))
        if row is None:
            raise ConfigError(f"username: no reader {username}")
        row.active = active
