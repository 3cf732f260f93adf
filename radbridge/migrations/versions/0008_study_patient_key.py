"""studies.patient_key: a study's patient, for the reading room's priors

A hash of the agreement and the de-identified data set's (pseudonymous) Patient ID, set when
the center receives the study: the prior studies of a patient are one indexed query, not a
scan of the agreement's files. Studies received before this revision have none (no priors).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("patient_key", sa.String(64), nullable=True))
        batch.create_index("ix_studies_agreement_patient", ["agreement_id", "patient_key"])


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_agreement_patient")
        batch.drop_column("patient_key")
