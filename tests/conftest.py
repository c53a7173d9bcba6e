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
