"""Shared fixtures: real Orthanc and node processes, torn down after each test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.peers import start_orthanc

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture
def artifacts(request) -> Path:
    """A folder kept after the run (screenshots, logs, emitted objects) for inspection."""
    folder = ARTIFACTS / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def node_port() -> int:
    from tests.support.peers import free_port

    return free_port()


@pytest.fixture
def orthanc(tmp_path, node_port):
    pacs = start_orthanc(tmp_path / "orthanc", {"node": ["DICOMNODE", "127.0.0.1", node_port]})
    yield pacs
    pacs.stop()


@pytest.fixture(scope="session")
def old_monai(tmp_path_factory):
    """A bundle made for MONAI 1.3.0 with its runtime prepared, once per run (`old_monai`)."""
    from tests.support.old_monai import prepared_old_monai

    return prepared_old_monai(tmp_path_factory.mktemp("old-monai"))


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the run (`tests.support.postgres`); each test makes its database."""
    from tests.support.postgres import PostgresCluster

    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """The node's database as an operator names it in [database], on each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'dicom-node.sqlite'}"
    return request.getfixturevalue("postgres").database()
