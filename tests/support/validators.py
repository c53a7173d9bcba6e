"""dciodvfy (dicom3tools), the independent judge of every object the node emits."""

from __future__ import annotations

import subprocess
from pathlib import Path


def dciodvfy_findings(path: Path) -> list[str]:
    """dciodvfy's errors and warnings on one file, one line each ("Error - ...", "Warning - ...")."""
    output = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False).stderr
    return [line for line in output.splitlines() if line.startswith(("Error", "Warning"))]


def dciodvfy_errors(path: Path) -> list[str]:
    return [line for line in dciodvfy_findings(path) if line.startswith("Error")]
