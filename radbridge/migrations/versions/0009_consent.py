"""the edge's consent register and its purge requests to the center

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "consents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("agreement_id", sa.String(63), nullable=False),
        sa.Column("person", sa.String(64), nullable=False),
        sa.Column("reference", sa.String(200), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("recorded_at", _TS, nullable=False),
        sa.Column("withdrawn_at", _TS, nullable=True),
        sa.ForeignKeyConstraint(
            ["agreement_id"], ["agreements.id"], name=op.f("fk_consents_agreement_id_agreements")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consents")),
        sa.UniqueConstraint("agreement_id", "person", name=op.f("uq_consents_agreement_id_person")),
    )
    op.create_table(
        "purge_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("agreement_id", sa.String(63), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _TS, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("done_at", _TS, nullable=True),
        sa.ForeignKeyConstraint(
            ["agreement_id"],
            ["agreements.id"],
            name=op.f("fk_purge_requests_agreement_id_agreements"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_purge_requests")),
        sa.UniqueConstraint(
            "agreement_id", "study_uid", name=op.f("uq_purge_requests_agreement_id_study_uid")
        ),
    )
    op.create_index("ix_purge_requests_state_next", "purge_requests", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_purge_requests_state_next", table_name="purge_requests")
    op.drop_table("purge_requests")
    op.drop_table("consents")
