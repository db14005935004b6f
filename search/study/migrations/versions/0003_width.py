"""Layer rows carry the heads and MLP units a block keeps (plans that cut width; NULL: all)."""

import sqlalchemy as sa
from alembic import op

from search.study.migrations import has_column

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for name in ("heads", "mlp_hidden"):
        if not has_column(op.get_bind(), "ltmp_layer_results", name):
            op.add_column("ltmp_layer_results", sa.Column(name, sa.Integer, nullable=True))
