"""The center's own schema: the edge's tables leave the center's database

From here the migrations branch per node (``edge@head``, ``center@head``). The edge's tables
(identity map, deliveries, person ledger, consents, purge requests) were created empty in every
center database by the shared chain; a center never wrote them (its code has no path to them),
so dropping them loses nothing, and no identity map table is left at the center to misuse.

Revision ID: 0012c
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from radbridge.migrations.node_schema import drop_tables, restore_tables

revision = "0012c"
down_revision = "0011"
branch_labels = ("center",)
depends_on = None


def upgrade() -> None:
    drop_tables("center")


def downgrade() -> None:
    restore_tables("center")
