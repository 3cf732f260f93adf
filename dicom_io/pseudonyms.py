"""Keyed pseudonyms: HMAC-SHA256 with a per-agreement key, never an unkeyed hash.

PS3.15 E.3.9 warns that unkeyed hashes of UIDs fall to dictionary attacks; with a key kept at
the hospital, the same original always maps to the same pseudonym within one agreement (so
studies stay consistent) and nobody without the key can reverse or test a guess.

An agreement that selects Retain UIDs (PS3.15 E.3.9) gets a pseudonymizer that hands every UID
back unchanged, and still records it, so the identity map and the center agree on the study UID.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from radbridge.agreements import Agreement, DeidOption
from radbridge.errors import DeidentificationError

__all__ = ["Pseudonymizer", "agreement_key"]


def agreement_key(agreement: Agreement, master_secret: str) -> bytes:
    """The agreement's pseudonym key: its own secret if configured, else derived from the master."""
    env = agreement.deidentification.secret_env
    if env:
        value = os.environ.get(env)
        if not value:
            raise DeidentificationError(
                f"agreement {agreement.id}: deidentification.secret_env names {env}, which is unset"
            )
        return hashlib.sha256(value.encode()).digest()
    return hmac.new(
        master_secret.encode(), f"radbridge/agreement/{agreement.id}".encode(), hashlib.sha256
    ).digest()


class Pseudonymizer:
    """Issues pseudonyms and remembers what it issued (for the edge's identity map)."""

    def __init__(self, key: bytes, *, retain_uids: bool = False) -> None:
        self._key = key
        self.retain_uids = retain_uids
        self.issued: dict[tuple[str, str], str] = {}

    @classmethod
    def for_agreement(cls, agreement: Agreement, master_secret: str) -> Pseudonymizer:
        """The agreement's pseudonymizer: its key, and Retain UIDs when the agreement selects it."""
        retain = DeidOption.RETAIN_UIDS in agreement.deidentification.options
        return cls(agreement_key(agreement, master_secret), retain_uids=retain)

    def _mac(self, kind: str, original: str) -> bytes:
        return hmac.new(self._key, f"{kind}\x00{original}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """A UID under the 2.25 root (PS3.5 B.2) derived from 128 bits of the keyed MAC.

        With ``retain_uids`` the original itself (Retain UIDs Option), recorded all the same.
        """
        cached = self.issued.get(("uid", original))
        if cached is not None:
            return cached
        if self.retain_uids:
            value = original
        else:
            value = "2.25." + str(int.from_bytes(self._mac("uid", original)[:16], "big"))
        self.issued[("uid", original)] = value
        return value

    def token(self, kind: str, original: str, prefix: str, length: int = 12) -> str:
        """An opaque identifier such as ``RB7K2Q...`` for patient IDs or accession numbers."""
        cached = self.issued.get((kind, original))
        if cached is not None and cached.startswith(prefix) and len(cached) == len(prefix) + length:
            return cached
        digest = base64.b32encode(self._mac(kind, original)).decode().rstrip("=")
        value = prefix + digest[:length]
        self.issued[(kind, original)] = value
        return value
