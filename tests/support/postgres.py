"""A real PostgreSQL for the tests: a cluster made with `initdb` in a temporary folder, served by
`pg_ctl` on a free port of the loopback, and removed afterwards.

PostgreSQL refuses to run as root; as root (CI), the cluster belongs to the `postgres` user
that Debian's package creates, and its commands run as that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.peers import free_port, wait_for


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def available() -> bool:
    return _binaries() is not None


class PostgresCluster:
    """One server; each test takes a database of its own (`database`)."""

    def __init__(self) -> None:
        self.bin = _binaries()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.port = free_port()
        self._as_owner = os.geteuid() == 0
        if self._as_owner:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self._databases = 0
        self._run("initdb", "-D", str(self.root / "data"), "-U", "dicomnode", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "server.log"), "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on", "start")
        wait_for(lambda: self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False).returncode == 0,
                 30, "PostgreSQL to accept connections")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / tool), *args]
        if self._as_owner:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=self.root)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stderr or result.stdout}")
        return result

    def database(self) -> str:
        """A new, empty database, as the URL an operator writes in `[database]`."""
        self._databases += 1
        name = f"node{self._databases}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "dicomnode", name)
        return f"postgresql://dicomnode@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
