"""Layer rows carry the uid of their study, so rows of a deleted study never attach to a new one of its name."""

import sqlalchemy as sa
from alembic import op

from search.study.migrations import has_column

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if not has_column(op.get_bind(), "ltmp_layer_results", "study_uid"):
        op.add_column("ltmp_layer_results", sa.Column("study_uid", sa.String(32), nullable=True))
