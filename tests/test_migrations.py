"""Migrations: `alembic` run by hand reads TUNEFORGE_DATABASE_URL, as alembic.ini says; they build the ORM schema."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_alembic_by_hand_migrates_the_configured_database(tmp_path: Path) -> None:
    db = tmp_path / "by-hand" / "tuneforge.db"
    env = {**os.environ, "TUNEFORGE_DATABASE_URL": f"sqlite:///{db}"}
    out = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        [(version,)] = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    assert {"tenants", "api_keys", "files", "jobs", "job_events", "adapters"} <= tables
    heads = sorted(p.name.split("_", 1)[0] for p in (ROOT / "migrations" / "versions").glob("0*.py"))
    assert version == heads[-1]


@pytest.mark.parametrize("backend", ["embedded", "production"])
def test_the_migrations_build_exactly_the_orm_schema(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Every table, column, index and constraint of the models comes from a migration, on both databases."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from app.core.db import migrate
    from app.core.models import Base

    if backend == "embedded":
        url = f"sqlite:///{tmp_path / 'schema.db'}"
        migrate(url)
    else:
        url = request.getfixturevalue("pg_url")  # migrated by the fixture
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()
    assert differences == []
