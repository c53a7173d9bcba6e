"""The benchmarks keep working: their memory probe measures what it claims, and the ingest
benchmark runs end to end. Their numbers are not checked here: timing belongs to the
benchmarks themselves, on a quiet machine."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.common import PeakMemory

ROOT = Path(__file__).resolve().parents[1]

HOLD_200_MB = """
import sys, time
block = bytearray(200 * 2**20)
for offset in range(0, len(block), 4096):
    block[offset] = 1  # touched: resident, not only reserved
print("ready", flush=True)
sys.stdin.readline()
"""


def test_the_memory_probe_sees_a_childs_peak_and_leaves_out_what_it_is_told_to():
    starts_the_child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {HOLD_200_MB!r}])"
    parent = subprocess.Popen([sys.executable, "-c", starts_the_child], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        [child] = psutil.Process(parent.pid).children()
        with PeakMemory(parent.pid) as memory:
            time.sleep(0.2)
        assert memory.peak_mb() >= 200
        assert memory.peak_mb(leave_out=[child.pid]) < 100
        assert memory.peak_mb_of([child.pid]) >= 200
    finally:
        parent.communicate("\n", timeout=30)


def test_the_ingest_benchmark_runs_and_prints_rates_and_memory():
    result = subprocess.run(
        # One payload (--slices 0 leaves the CT out): each row starts a node, whose worker takes
        # PyTorch's import time to get ready, and one payload runs every path of the script.
        [sys.executable, str(ROOT / "benchmarks" / "ingest.py"), "--slices", "0", "--small", "20", "--repeat", "1",
         "--only", "dicom-node", "--only", "dicom-node-no-http"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    header = next(line for line in result.stdout.splitlines() if line.startswith("payload"))
    assert header.split()[-2:] == ["peak", "MB"]
    node_rows = [line.split() for line in result.stdout.splitlines() if "dicom-node" in line.split()]
    assert len(node_rows) == 2  # one and four associations
    assert all(50 < float(row[-1]) < 400 for row in node_rows)  # main process and receiver, not the worker
    assert "The node's idle worker beside them" in result.stdout
    watched = [line for line in result.stdout.splitlines() if "node, dashboard polled / HTTP off" in line]
    assert len(watched) == 2 and all(float(line.split()[-3]) > 0 for line in watched)


def test_the_purge_benchmark_purges_the_finished_studies_and_leaves_the_others():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "purge.py"), "--studies", "20", "--instances", "3", "--kb", "4"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("  ")[0]: line.split() for line in result.stdout.splitlines()}
    assert "80 files" in " ".join(rows["node: files, one study at a time"])  # 20 x (3 instances + 1 SEG)
    assert "20 studies" in " ".join(rows["node: rows"])
    assert "60 of 60 left in place" in result.stdout


def test_the_database_benchmark_runs_on_both_backends():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "database.py"), "--small", "20", "--studies", "1", "--workers", "1",
         "--repeat", "1"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("  ")[0]: line.split() for line in result.stdout.splitlines()}
    for measure in ("ingest, images/s", "jobs/min, 1 worker(s)"):
        assert float(rows[measure][-3]) > 0 and float(rows[measure][-2]) > 0, rows[measure]
