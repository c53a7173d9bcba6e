"""Real peers for tests: an Orthanc PACS and the node itself, each as a separate process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dcmtk_env() -> dict[str, str]:
    """DCMTK (and Orthanc, built on it) is slow on loopback without TCP_NODELAY."""
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Orthanc:
    """A throw-away Orthanc playing the hospital PACS."""

    process: subprocess.Popen
    http_port: int
    dicom_port: int
    ae_title: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | dict | list | None = None, timeout: float = 120):
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content = response.read()
        if response.headers.get_content_type() == "application/json":
            return json.loads(content)
        return content

    def get(self, path: str):
        return self.request("GET", path)

    def series_of_study(self, study_uid: str) -> list[dict]:
        """Orthanc's series of the study with this Study Instance UID (empty when unknown)."""
        found = self.request("POST", "/tools/lookup", study_uid.encode())
        studies = [item["ID"] for item in found if item["Type"] == "Study"]
        return self.get(f"/studies/{studies[0]}/series") if studies else []

    def modality_counts(self, study_uid: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for series in self.series_of_study(study_uid):
            modality = series["MainDicomTags"].get("Modality", "")
            counts[modality] = counts.get(modality, 0) + len(series["Instances"])
        return counts

    def upload(self, paths: list[Path]) -> str:
        """Store files as if a modality had sent them; returns Orthanc's study id."""
        study_id = ""
        for path in paths:
            study_id = self.request("POST", "/instances", path.read_bytes())["ParentStudy"]
        return study_id

    def alive(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def restart_orthanc(orthanc: Orthanc) -> Orthanc:
    """The same PACS again (same storage, ports and configuration) after :meth:`Orthanc.stop`."""
    config_path = orthanc.log_path.parent / "orthanc.json"
    process = subprocess.Popen(
        ["Orthanc", str(config_path)], stdout=open(orthanc.log_path, "ab"), stderr=subprocess.STDOUT, env=dcmtk_env()
    )
    restarted = Orthanc(process, orthanc.http_port, orthanc.dicom_port, orthanc.ae_title, orthanc.log_path)
    wait_for(restarted.alive, 60, "Orthanc's REST API after a restart")
    return restarted


def storescu(ae_title: str, port: int, paths: list[Path], *options: str, timeout: float = 300):
    """Send files as a modality does; returns the completed process (verbose output in stderr)."""
    return subprocess.run(
        ["storescu", "-v", *options, "-aec", ae_title, "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=timeout,
    )


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb


def start_orthanc(
    workdir: Path, modalities: dict[str, list], ae_title: str = "ORTHANC", dicomweb: bool = False,
    settings: dict | None = None,
) -> Orthanc:
    """A fresh Orthanc; with ``dicomweb``, its DICOMweb plugin serves ``/dicom-web/`` (for viewers);
    ``settings``, more of Orthanc's configuration (DICOM TLS, say)."""
    if shutil.which("Orthanc") is None:
        raise RuntimeError("Orthanc is not installed: run `make test`, which installs the system packages")
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "test-pacs",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ae_title,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomModalities": modalities,
        "Plugins": [],
        "StableAge": 2,
    }
    if dicomweb:
        if not DICOMWEB_PLUGIN.exists():
            raise RuntimeError(f"{DICOMWEB_PLUGIN} is missing: run `make test`, which installs orthanc-dicomweb")
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full",
                              "SeriesMetadata": "Full"}
    config.update(settings or {})
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    process = subprocess.Popen(
        ["Orthanc", str(config_path)],
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        env=dcmtk_env(),
    )
    orthanc = Orthanc(process, http_port, dicom_port, ae_title, log_path)
    try:
        wait_for(orthanc.alive, 60, "Orthanc's REST API")
    except TimeoutError:
        orthanc.stop()
        raise RuntimeError(f"Orthanc did not start; see {log_path}:\n{log_path.read_text()[-3000:]}")
    return orthanc


@dataclass
class Node:
    """The node under test, started the way an operator starts it."""

    process: subprocess.Popen
    config_path: Path
    port: int
    ae_title: str
    log_path: Path
    calling_ae_title: str = "ECHOSCU"

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        if result.returncode != 0:
            raise RuntimeError(f"dicom-node {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def echo(self) -> bool:
        result = subprocess.run(
            ["echoscu", "-aet", self.calling_ae_title, "-aec", self.ae_title, "127.0.0.1", str(self.port)],
            capture_output=True,
            env=dcmtk_env(),
            timeout=30,
        )
        return result.returncode == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready_workers(self) -> list[int]:
        """The process ids of the workers that have said they are ready, in the order they said
        it: a worker restarted by the node adds its own. Empty until the first is ready."""
        return [int(pid) for pid in re.findall(r"worker \S+:(\d+) ready", self.log())]

    @property
    def http_url(self) -> str:
        """Where the node's dashboard, API and metrics answer (its [http] port, on loopback)."""
        from dicom_node.config import load_config

        return f"http://127.0.0.1:{load_config(self.config_path).http.port}"

    def wait_for_http(self, timeout: float = 60) -> None:
        wait_for(lambda: "dashboard, API and metrics on" in self.log(), timeout, "the node's HTTP server")

    @property
    def data_dir(self) -> Path:
        from dicom_node.config import load_config

        return load_config(self.config_path).node.data_dir

    def query(self, sql: str, *parameters) -> list[tuple]:
        """Read the node's state as an operator's script would: straight from its database
        (``?`` marks the parameters, on either backend)."""
        from dicom_node.config import load_config

        config = load_config(self.config_path)
        if not config.embedded_database:
            import psycopg

            with psycopg.connect(config.database_url) as connection:
                if parameters:  # psycopg's placeholders are %s, and a literal % is %%
                    return [tuple(r) for r in connection.execute(sql.replace("%", "%%").replace("?", "%s"), parameters)]
                return [tuple(row) for row in connection.execute(sql)]
        database = config.database_path
        if not database.exists():
            return []
        with sqlite3.connect(database, timeout=30) as connection:
            return connection.execute(sql, parameters).fetchall()

    def finished_job_states(self) -> list[str]:
        """Every job's state once there is at least one and none is queued or running; empty
        until then. A study sent with a pause longer than stable_after (a stalled machine is
        enough) completes twice and its series gets a second job, so a test looks at all of
        them rather than count on exactly one."""
        states = [state for (state,) in self.query("SELECT state FROM jobs ORDER BY id")]
        return [] if not states or {"queued", "running"} & set(states) else states

    def kill(self) -> None:
        """kill -9 of every process of the node at once (main, receivers, workers): no clean-up of
        any kind, as in a power cut. Killing the main process alone would let its children stop
        gracefully, which is what they do, but not what this simulates."""
        tree = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        for process in tree:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def write_node_config(workdir: Path, port: int, destinations: list[dict], pipelines: list[dict],
                      http: dict | None = None, webhooks: list[dict] = (), retention: dict | None = None,
                      database_url: str | None = None, **node) -> Path:
    """A TOML configuration, written by hand so the test exercises the operator's format. The
    HTTP server gets a free port unless ``http`` says otherwise, so that nodes of several tests
    (or two nodes of one) never contend for the default 8080."""

    def value(v) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return str(v).lower() if isinstance(v, bool) else str(v)

    lines = ["[node]", f"port = {port}", f"data_dir = {value(str(workdir / 'data'))}"]
    lines += [f"{k} = {value(v)}" for k, v in node.items()]
    lines += ["", "[http]"] + [f"{k} = {value(v)}" for k, v in {"port": free_port(), **(http or {})}.items()]
    if retention:
        lines += ["", "[retention]"] + [f"{k} = {value(v)}" for k, v in retention.items()]
    if database_url and not database_url.startswith("sqlite:///"):
        lines += ["", "[database]", f"url = {value(database_url)}"]
    for webhook in webhooks:
        lines += ["", "[[webhooks]]"] + [f"{k} = {value(v)}" for k, v in webhook.items()]
    for destination in destinations:
        lines += ["", "[[destinations]]"] + [f"{k} = {value(v)}" for k, v in destination.items()]
    for pipeline in pipelines:
        select = pipeline.get("select", {})
        lines += ["", "[[pipelines]]"]
        lines += [f"{k} = {value(v)}" for k, v in pipeline.items() if k != "select"]
        lines += ["[pipelines.select]"] + [f"{k} = {value(v)}" for k, v in select.items()]
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "node.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_node(
    config_path: Path, port: int, ae_title: str = "DICOMNODE", calling_ae_title: str = "ECHOSCU", echo: bool = True
) -> Node:
    """Start `dicom-node serve`; ready once it answers C-ECHO (or, with ``echo=False``, once it
    says it listens: for configurations that refuse this machine's echo on purpose)."""
    log_path = config_path.parent / "node.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config_path)],
        stdout=open(log_path, "ab"),  # appended: a restarted node keeps one log
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    node = Node(process, config_path, port, ae_title, log_path, calling_ae_title)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the node exited with {process.returncode}:\n{node.log()[-3000:]}")
        return node.echo() if echo else "listening as" in node.log()

    try:
        wait_for(ready, 60, "the node to answer C-ECHO")
    except BaseException:
        node.stop()  # a node that never got ready must not outlive the test that started it
        raise
    return node
