"""The schema's migrations, on SQLite and PostgreSQL: they build exactly the schema the code
declares, a database made before migrations is upgraded in place with its rows, and
`dicom-node db upgrade` says what it did."""

from __future__ import annotations

import subprocess
import sys

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text

from dicom_node.state import db, migrate
from tests.support.peers import ROOT


def test_the_migrations_build_exactly_the_schema_the_code_declares(database_url):
    engine = db.connect(database_url)
    with engine.connect() as connection:
        assert migrate.current(connection) == migrate.head()
        differences = compare_metadata(MigrationContext.configure(connection), db.metadata)
    assert differences == []


def test_a_database_made_before_migrations_is_upgraded_in_place(database_url):
    engine = db.engine_for(database_url)
    with engine.begin() as connection:  # the tables as the node made them then, and no revision
        command.upgrade(migrate._config(connection), migrate.BASELINE)
        connection.execute(text("DROP TABLE alembic_version"))
        connection.execute(text("INSERT INTO studies (study_uid, state, first_received_at, last_received_at) "
                                "VALUES ('1.2.3', 'complete', 1, 2)"))
    engine.dispose()
    engine = db.connect(database_url)
    with engine.connect() as connection:
        assert migrate.current(connection) == migrate.head()
        assert "instances_purged_at" in {column["name"] for column in inspect(connection).get_columns("studies")}
        assert connection.execute(select(db.studies.c.study_uid, db.studies.c.instances_purged_at)).all() == [
            ("1.2.3", None)]


def test_db_upgrade_says_what_it_did(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')

    def upgrade() -> str:
        result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "db", "upgrade", "--config", str(config)],
                                capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert upgrade() == f"database created at revision {migrate.head()}"
    assert upgrade() == f"database already at revision {migrate.head()}"
