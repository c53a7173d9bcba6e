"""Liveness and readiness: what a load balancer or an orchestrator asks before sending work.

`/healthz` says the process answers. `/readyz` says the node can take a study now: its DICOM
listener serves, the database answers, every configured worker is alive, and the disk under
``data_dir`` is above the watermark at which C-STORE would answer Out of Resources.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine, text

from dicom_node.config import Config
from dicom_node.state import db


class NodeProcesses(Protocol):
    """What the supervisor tells of the processes it runs."""

    def listener_serving(self) -> bool: ...

    def receivers_alive(self) -> int: ...

    def workers_alive(self) -> int: ...


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


def free_disk_bytes(config: Config) -> int:
    return shutil.disk_usage(config.node.data_dir).free


def readiness(config: Config, engine: Engine, processes: NodeProcesses) -> dict[str, Check]:
    checks = {}
    serving = processes.listener_serving()
    checks["dicom_listener"] = Check(serving, f"{processes.receivers_alive()} receiver process(es) on port "
                                              f"{config.node.port}" if serving else "the DICOM listener is not serving")
    try:
        with db.reading(engine) as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = Check(True, engine.dialect.name)
    except Exception as error:  # noqa: BLE001 - any failure to answer is the check's answer
        checks["database"] = Check(False, f"the database does not answer: {error}")
    alive = processes.workers_alive()
    checks["workers"] = Check(alive >= config.node.workers, f"{alive} of {config.node.workers} worker(s) alive")
    free_mb = free_disk_bytes(config) / 1024 / 1024
    checks["disk"] = Check(free_mb >= config.node.min_free_disk_mb,
                           f"{free_mb:.0f} MB free under data_dir, watermark {config.node.min_free_disk_mb:g} MB")
    return checks
