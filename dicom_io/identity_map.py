"""The edge's identity map: original identifier <-> pseudonym, stored only in the edge database."""

from __future__ import annotations

from sqlalchemy import select

from radbridge.db.engine import Database
from radbridge.db.tables import IdentityMapRow, utcnow

__all__ = ["lookup_original", "lookup_pseudonym", "originals_for", "record_pseudonyms"]


def record_pseudonyms(db: Database, agreement_id: str, issued: dict[tuple[str, str], str]) -> None:
    """Persist issued pseudonyms (idempotent) — committed before anything leaves the edge."""
    if not issued:
        return
    rows = [
        {
            "agreement_id": agreement_id,
            "kind": kind,
            "original": original,
            "pseudonym": pseudonym,
            "created_at": utcnow(),
        }
        for (kind, original), pseudonym in issued.items()
    ]
    stmt = db.insert_or_skip(IdentityMapRow, ["agreement_id", "kind", "original"])
    with db.session() as s:
        s.execute(stmt, rows)


def lookup_original(db: Database, agreement_id: str, kind: str, pseudonym: str) -> str | None:
    """Reverse a pseudonym (used by re-identification of returned results)."""
    with db.session() as s:
        return s.scalars(
            select(IdentityMapRow.original).where(
                IdentityMapRow.agreement_id == agreement_id,
                IdentityMapRow.kind == kind,
                IdentityMapRow.pseudonym == pseudonym,
            )
        ).first()


def originals_for(
    db: Database, agreement_id: str, kind: str, pseudonyms: set[str]
) -> dict[str, str]:
    """Reverse many pseudonyms at once: {pseudonym: original} for those this edge issued."""
    out: dict[str, str] = {}
    values = sorted(pseudonyms)
    with db.session() as s:
        for i in range(0, len(values), 500):
            rows = s.execute(
                select(IdentityMapRow.pseudonym, IdentityMapRow.original).where(
                    IdentityMapRow.agreement_id == agreement_id,
                    IdentityMapRow.kind == kind,
                    IdentityMapRow.pseudonym.in_(values[i : i + 500]),
                )
            ).all()
            out.update({p: o for p, o in rows})
    return out


def lookup_pseudonym(db: Database, agreement_id: str, kind: str, original: str) -> str | None:
    """The pseudonym issued for an original identifier, if it has left the edge."""
    with db.session() as s:
        return s.scalars(
            select(IdentityMapRow.pseudonym).where(
                IdentityMapRow.agreement_id == agreement_id,
                IdentityMapRow.kind == kind,
                IdentityMapRow.original == original,
            )
        ).first()
