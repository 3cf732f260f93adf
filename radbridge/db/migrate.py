"""Run the Alembic migrations shipped inside the package, on one node's branch."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from radbridge.db.engine import create_db_engine, normalize_url
from radbridge.db.tables import NODES, Node
from radbridge.errors import ConfigError

__all__ = ["alembic_config", "node_of", "upgrade"]

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def node_of(url: str) -> Node | None:
    """The node whose branch the database at ``url`` is on; None while it is on the shared
    trunk (new, or last upgraded before the branches)."""
    script = ScriptDirectory.from_config(alembic_config(url))
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            heads = MigrationContext.configure(conn).get_current_heads()
    finally:
        engine.dispose()
    for node in NODES:
        branch = {r.revision for r in script.iterate_revisions(f"{node}@head", "0011")} - {"0011"}
        if branch & set(heads):
            return node
    return None


def upgrade(url: str, node: Node) -> None:
    """Bring the database at ``url`` to the head of ``node``'s branch (creating a SQLite file
    if needed). A database on the other node's branch is refused, naming both."""
    if node not in NODES:
        raise ValueError(f"node must be one of {NODES}, not {node!r}")
    create_db_engine(url).dispose()  # creates the SQLite parent folder
    held = node_of(url)
    if held is not None and held != node:
        raise ConfigError(
            f"this is the {held}'s database, not the {node}'s: each node has its own "
            f"(edge.database_url, center.database_url)"
        )
    command.upgrade(alembic_config(url), f"{node}@head")
