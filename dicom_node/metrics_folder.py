"""The folder where every process of `serve` keeps its Prometheus counters (`dicom_node.metrics`).

prometheus_client decides at import whether it counts in files shared by processes or in the
process's memory, so the folder is named in the environment before anything imports it, and
every child process (spawned, with a fresh interpreter) inherits it. It is emptied at each
start, before any child exists: counts run from the node's start, as Prometheus expects of a
counter, and the files of processes of an earlier run are not added to this one's.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def use_folder(data_dir: Path, instance: str) -> Path:
    """Count in ``data_dir``/metrics/``instance`` from now on, in this process and those it
    starts: a folder per node (`Config.instance_name`), as nodes may share a data_dir."""
    if "prometheus_client" in sys.modules and os.environ.get(MULTIPROCESS_ENV) is None:
        raise RuntimeError("prometheus_client was imported before the metrics folder was set: counters would "
                           "stay in one process")
    folder = data_dir / "metrics" / instance
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROCESS_ENV] = str(folder)
    return folder
