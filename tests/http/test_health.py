"""Readiness says which check fails: a load balancer stops sending studies to a node that cannot
take them (no listener, no database, a dead worker, a full disk)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.testclient import TestClient

from dicom_node.config import Config
from dicom_node.http.app import create_app
from dicom_node.state import db


@dataclass
class Processes:
    serving: bool = True
    receivers: int = 1
    workers: int = 1

    def listener_serving(self) -> bool:
        return self.serving

    def receivers_alive(self) -> int:
        return self.receivers

    def workers_alive(self) -> int:
        return self.workers


def app_for(tmp_path, processes: Processes, **node) -> TestClient:
    config = Config.model_validate({"node": {"data_dir": str(tmp_path), "workers": 2, **node}})
    return TestClient(create_app(config, db.connect(config.database_url), processes))


def test_ready_when_every_check_holds(tmp_path):
    answer = app_for(tmp_path, Processes(workers=2), min_free_disk_mb=0).get("/readyz")
    assert answer.status_code == 200 and answer.json()["ready"]


def test_not_ready_names_each_failing_check(tmp_path):
    client = app_for(tmp_path, Processes(serving=False, receivers=0, workers=1), min_free_disk_mb=10**9)
    answer = client.get("/readyz")
    assert answer.status_code == 503
    body = answer.json()
    assert body["failing"] == ["dicom_listener", "workers", "disk"]
    assert body["checks"]["workers"]["detail"] == "1 of 2 worker(s) alive"
    assert body["checks"]["database"]["ok"]
    assert client.get("/healthz").status_code == 200, "alive all the same"
