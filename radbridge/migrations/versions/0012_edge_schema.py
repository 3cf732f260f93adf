"""The edge's own schema: the center's tables leave the edge's database

From here the migrations branch per node (``edge@head``, ``center@head``). The center's tables
(jobs, results, result objects, the reading room's) were created empty in every edge database by
the shared chain; an edge never wrote them, so dropping them loses nothing.

Revision ID: 0012e
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from radbridge.migrations.node_schema import drop_tables, restore_tables

revision = "0012e"
down_revision = "0011"
branch_labels = ("edge",)
depends_on = None


def upgrade() -> None:
    drop_tables("edge")


def downgrade() -> None:
    restore_tables("edge")
