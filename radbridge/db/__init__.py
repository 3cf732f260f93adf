"""Database layer: SQLAlchemy 2 tables, engine factory, Alembic migrations."""

from radbridge.db.engine import Database, create_db_engine
from radbridge.db.migrate import upgrade

__all__ = ["Database", "create_db_engine", "upgrade"]
