"""Engine, sessions and schema migrations of the job store.

SQLite (the single-machine default) is opened in WAL mode with a busy timeout so that the
gateway and worker processes can write concurrently; foreign keys are enforced. PostgreSQL is
used as given by URL. The schema is created and upgraded by Alembic only (``upgrade_schema``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    """Create an engine for ``url`` with the per-backend settings described above."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pool as large as the gateway's thread pool (anyio: 40), so connections are reused
    return create_engine(url, pool_pre_ping=True, pool_size=40, max_overflow=10)


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """Return the process-wide engine of ``url`` (one pool per URL and process)."""
    return make_engine(url)


@lru_cache(maxsize=8)
def _factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """Yield a session that commits on success and rolls back on any exception."""
    session = _factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Any:
    """Return the Alembic configuration for ``url`` (migrations shipped in the package)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_schema(url: str) -> None:
    """Create or upgrade the schema at ``url`` to the newest migration."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")
