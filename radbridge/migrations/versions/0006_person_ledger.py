"""the edge's PIPL person ledger and its yearly counts

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "person_ledger",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hospital", sa.String(200), nullable=False),
        sa.Column("year", sa.Integer(), nullable=False),
        sa.Column("person", sa.String(64), nullable=False),
        sa.Column("agreement_id", sa.String(63), nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_person_ledger")),
        sa.UniqueConstraint(
            "hospital", "year", "person", name=op.f("uq_person_ledger_hospital_year_person")
        ),
    )
    op.create_table(
        "person_ledger_years",
        sa.Column("hospital", sa.String(200), nullable=False),
        sa.Column("year", sa.Integer(), nullable=False),
        sa.Column("persons", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("hospital", "year", name=op.f("pk_person_ledger_years")),
    )


def downgrade() -> None:
    op.drop_table("person_ledger_years")
    op.drop_table("person_ledger")
