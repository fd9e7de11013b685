"""The schema is created only by Alembic: upgrade/downgrade on a fresh database, ORM == migrated schema."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine


@pytest.fixture
def fresh_db(pytestconfig) -> Iterator[tuple[str, Engine]]:  # type: ignore[no-untyped-def]
    """An empty database of its own on the test server (dropped afterwards)."""
    from tests import services

    server = pytestconfig._crowdsam[0]
    url = services.create_database(server)
    engine = create_engine(url)
    try:
        yield url, engine
    finally:
        engine.dispose()
        services.drop_database(server, url)


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def _diffs(engine: Engine) -> list:  # type: ignore[type-arg]
    from app.models import Base

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return list(compare_metadata(context, Base.metadata))


def _leftovers(engine: Engine) -> dict[str, list[str]]:
    """User objects a downgrade must remove besides tables: enum types, sequences, indexes."""
    queries = {
        "types": "SELECT typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                 "WHERE n.nspname = 'public' AND t.typtype = 'e'",
        "sequences": "SELECT sequence_name FROM information_schema.sequences WHERE sequence_schema = 'public'",
        "indexes": "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename <> 'alembic_version'",
    }
    with engine.connect() as conn:
        return {k: [r[0] for r in conn.execute(text(q))] for k, q in queries.items()}


def test_upgrade_downgrade_upgrade(fresh_db):
    from app import migrate
    from app.models import Base

    url, engine = fresh_db
    assert _tables(engine) == set()

    migrate.upgrade(url)
    assert _tables(engine) == set(Base.metadata.tables) | {"alembic_version"}
    assert _diffs(engine) == []

    migrate.downgrade(url, "base")
    assert _tables(engine) <= {"alembic_version"}, _tables(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 0
    assert _leftovers(engine) == {"types": [], "sequences": [], "indexes": []}

    migrate.upgrade(url)
    assert _tables(engine) == set(Base.metadata.tables) | {"alembic_version"}
    assert _diffs(engine) == []


def test_orm_metadata_matches_the_session_database():
    """The database every other test runs on was migrated, not created from metadata."""
    from app.core.db import get_engine

    assert _diffs(get_engine()) == []
    with get_engine().connect() as conn:
        head = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    from alembic.script import ScriptDirectory

    from app.migrate import alembic_config

    assert head == ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_migrations_have_a_single_head():
    from alembic.script import ScriptDirectory

    from app.migrate import alembic_config

    assert len(ScriptDirectory.from_config(alembic_config()).get_heads()) == 1
