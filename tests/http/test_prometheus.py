"""A real Prometheus scrapes the node: counters kept by several receiver processes add up to
what was sent, and the gauges read from the database say what `status` says."""

from __future__ import annotations

import shutil
import subprocess

import httpx

from tests.support.ct_study import small_study
from tests.support.peers import free_port, start_node, storescu, wait_for, write_node_config


def start_prometheus(workdir, target: str) -> tuple[subprocess.Popen, str]:
    executable = shutil.which("prometheus")
    if executable is None:
        raise RuntimeError("prometheus is not installed: run `make test`, which installs the system packages")
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: dicom-node\n    static_configs:\n      - targets: ['{target}']\n")
    with open(workdir / "prometheus.log", "wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [executable, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def query(prometheus: str, expression: str) -> float | None:
    """The expression's first value; None while Prometheus cannot answer yet (not listening, or
    503 "Service Unavailable" until its storage is open)."""
    try:
        response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=5)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    result = response.json().get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


def test_prometheus_sums_the_instances_received_across_receiver_processes(tmp_path):
    port = free_port()
    config = write_node_config(tmp_path / "node", port, destinations=[], pipelines=[], stable_after=1,
                               min_free_disk_mb=0, receivers=2)
    node = start_node(config, port)
    prometheus, prometheus_url = None, ""
    try:
        node.wait_for_http()
        prometheus, prometheus_url = start_prometheus(tmp_path, node.http_url.removeprefix("http://"))
        wait_for(lambda: query(prometheus_url, 'up{job="dicom-node"}') == 1.0, 60, "Prometheus scraping the node", 1.0)
        sent = 0
        for seed in range(4):  # four associations, shared by the two receiver processes
            _, paths = small_study(tmp_path / f"study{seed}", slices=5, seed=seed)
            assert storescu("DICOMNODE", port, paths).returncode == 0
            sent += len(paths)
        per_process = httpx.get(f"{node.http_url}/metrics").text
        assert "dicom_node_receivers_alive 2.0" in per_process
        wait_for(lambda: query(prometheus_url, "sum(dicom_node_instances_received_total)") == sent, 60,
                 f"Prometheus to count {sent} instances", 1.0)
        # the four senders' and the C-ECHO that told the test the node was up
        assert query(prometheus_url, 'dicom_node_associations_total{outcome="accepted"}') == 5
        wait_for(lambda: query(prometheus_url, 'dicom_node_studies{state="done"}') == 4, 60,
                 "four studies done in Prometheus", 1.0)
        assert query(prometheus_url, "dicom_node_workers_alive") == 1
        assert query(prometheus_url, "dicom_node_free_disk_bytes") > 0
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        node.stop()
