"""A worker keeps freed blocks for reuse within a job and gives them back after it.

Each case runs in a fresh interpreter: the C library's settings are per process.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import torch
from dicom_node.compute.job_memory import give_back_freed_memory, reuse_freed_memory

def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20

reusing = sys.argv[1] == "reuse" and reuse_freed_memory()
start = resident_mb()
block = torch.ones(50_000_000)  # 200 MB, as a job's intermediate would be
del block
after_free = resident_mb()
give_back_freed_memory()
print(int(reusing), after_free - start, resident_mb() - start)
"""


def _probe(mode: str) -> tuple[bool, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    reusing, kept_after_free, kept_after_job = out.split()
    return bool(int(reusing)), int(kept_after_free), int(kept_after_job)


def test_a_freed_block_is_kept_for_the_next_step_and_given_back_after_the_job() -> None:
    reusing, kept_after_free, kept_after_job = _probe("reuse")
    assert reusing, "glibc did not take the settings"
    assert kept_after_free > 150, "the freed 200 MB went back at once: the next block faults in again"
    assert kept_after_job < 50, "the worker holds a job's memory after the job"


def test_without_the_setting_glibc_unmaps_a_large_block_at_once() -> None:
    """The control: what the setting changes."""
    reusing, kept_after_free, _ = _probe("default")
    assert not reusing
    assert kept_after_free < 50
