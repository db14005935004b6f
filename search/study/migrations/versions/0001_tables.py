"""The tables as the project made them before versioning, less the columns added since.

Per-layer rows of finished trials, benchmark results and per-study lock rows. A database made before
versioning may have any of them: only those missing are created.
"""

import sqlalchemy as sa
from alembic import op

from search.study.migrations import has_table

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if not has_table(bind, "ltmp_layer_results"):
        op.create_table(
            "ltmp_layer_results",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("study_name", sa.String(512), nullable=False),
            sa.Column("trial_number", sa.Integer, nullable=False),
            sa.Column("layer", sa.Integer, nullable=False),
            sa.Column("op", sa.String(32), nullable=False),
            sa.Column("keep", sa.Float, nullable=False),
            sa.Column("merge_keep", sa.Float, nullable=True),
            sa.Column("merge_threshold", sa.Float, nullable=True),
            sa.Column("prune_threshold", sa.Float, nullable=True),
            sa.Column("kept_tokens", sa.Float, nullable=True),
            sa.UniqueConstraint("study_name", "trial_number", "layer", name="uq_ltmp_layer"),
        )
        op.create_index("ix_ltmp_layer_results_study_name", "ltmp_layer_results", ["study_name"])
    if not has_table(bind, "ltmp_bench_results"):
        op.create_table(
            "ltmp_bench_results",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("created", sa.String(40), nullable=False),
            sa.Column("plan", sa.String(1024), nullable=False),
            sa.Column("model", sa.String(256), nullable=False),
            sa.Column("device", sa.String(256), nullable=False),
            sa.Column("batch_size", sa.Integer, nullable=False),
            sa.Column("mode", sa.String(16), nullable=False),
            sa.Column("amp", sa.Boolean, nullable=False),
            sa.Column("compiled", sa.Boolean, nullable=False),
            sa.Column("flops_ratio", sa.Float, nullable=False),
            sa.Column("images_per_s_base", sa.Float, nullable=False),
            sa.Column("images_per_s_plan", sa.Float, nullable=False),
            sa.Column("latency_ms_base", sa.Float, nullable=False),
            sa.Column("latency_ms_plan", sa.Float, nullable=False),
            sa.Column("speedup", sa.Float, nullable=False),
            sa.Column("ideal_fraction", sa.Float, nullable=False),
            sa.Column("runs", sa.Integer, nullable=False),
            sa.Column("peak_memory_mb", sa.Float, nullable=True),
        )
    if not has_table(bind, "ltmp_study_locks"):
        op.create_table("ltmp_study_locks", sa.Column("study_name", sa.String(512), primary_key=True))
