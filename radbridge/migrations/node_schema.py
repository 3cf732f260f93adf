"""What the per-node branch points (0012e, 0012c) do: drop the other node's tables.

A table is dropped only when it is empty: a database that served both nodes (never supported,
but possible before the branches) stops the upgrade, naming the table, instead of losing rows.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from radbridge.db.tables import CENTER_ONLY, EDGE_ONLY, Base, Node


def _others(node: Node) -> list[sa.Table]:
    """The other node's tables, in the order of their foreign keys."""
    other = CENTER_ONLY if node == "edge" else EDGE_ONLY
    return [t for t in Base.metadata.sorted_tables if t.name in other]


def drop_tables(node: Node) -> None:
    bind = op.get_bind()
    present = set(sa.inspect(bind).get_table_names())
    tables = [t for t in _others(node) if t.name in present]
    for table in tables:
        rows = bind.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
        if rows:
            raise RuntimeError(
                f"the {node}'s database holds {rows} row(s) in {table.name}, a table of the "
                f"other node: this database served both nodes. Give each node its own database "
                f"(edge.database_url, center.database_url) and move the rows before upgrading"
            )
    for table in reversed(tables):
        op.drop_table(table.name)


def restore_tables(node: Node) -> None:
    """The downgrade: the other node's tables again, empty, as defined at this revision (the
    current table definitions; a later migration that changes one of them must pin its shape
    here)."""
    bind = op.get_bind()
    for table in _others(node):
        table.create(bind, checkfirst=True)
