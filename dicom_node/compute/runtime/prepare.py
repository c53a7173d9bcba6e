"""Make a bundle's runtime: a virtual environment under ``data_dir/runtimes/<name>/``.

The environment is built in a directory of its own and renamed into place only when pip has
finished and ``runtime.json`` is written, so a runtime that exists is complete: a prepare that
fails or is interrupted leaves nothing a worker would use, and two prepares of the same spec
at once end with one runtime. pip is asked three times at most, each time for less (`spec`):
the exact pins, then the newest compatible releases, then the required packages alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dicom_node.compute.runtime.spec import RuntimeSpec, SpecError, spec_of

MANIFEST = "runtime.json"
PIP_SECONDS = 1800  # one pip run: PyTorch alone is ~900 MB to unpack
# Packages never built from source: a NumPy too old for this Python would compile for many
# minutes before failing; with this, pip says at once that no release fits.
BINARY_ONLY = "numpy,scipy,torch"
ATTEMPTS = (
    ("exact", "the exact releases the bundle names"),
    ("compatible", "the newest releases of the lines the bundle names"),
    ("required", "the newest releases of the lines of its required packages, without its optional ones"),
)


class PrepareError(RuntimeError):
    """No runtime could be made; the message says what pip refused."""


def runtimes_dir(data_dir: Path) -> Path:
    return data_dir / "runtimes"


def python_of(runtime: Path) -> Path:
    return runtime / "bin" / "python"


def prepared(runtimes: Path, spec: RuntimeSpec) -> Path | None:
    """The runtime made for ``spec``, if one was."""
    runtime = runtimes / spec.name
    return runtime if (runtime / MANIFEST).is_file() and python_of(runtime).exists() else None


class NotPrepared(SpecError):
    """The bundle's runtime was never made."""


def runtime_for(bundle_dir: Path, runtimes: Path) -> Path:
    """The runtime prepared for this bundle, or the reason in words with what to run."""
    spec = spec_of(bundle_dir)
    runtime = prepared(runtimes, spec)
    if runtime is None:
        raise NotPrepared(f"its runtime {spec.name} (MONAI {spec.monai}) is not prepared: run "
                          f"`dicom-node bundle prepare {bundle_dir} --config ...` with the node's configuration")
    return runtime


def prepare(bundle_dir: Path, runtimes: Path, say: Callable[[str], None]) -> Path:
    """The bundle's runtime, made now unless it exists. ``say`` hears each step in a line."""
    spec = spec_of(bundle_dir)
    existing = prepared(runtimes, spec)
    if existing is not None:
        say(f"runtime {spec.name} is already prepared; bundles that need the same share it")
        return existing
    runtimes.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(runtimes, spec)
    building = runtimes / f".building-{spec.name}-{os.getpid()}"
    started = time.monotonic()
    say(f"making runtime {spec.name} in {runtimes}")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, capture_output=True,
                       timeout=PIP_SECONDS)
        asked, notes = _install(python_of(building), spec, say)
        installed = _installed(python_of(building))
        (building / MANIFEST).write_text(json.dumps({
            "name": spec.name, "key": spec.key, "python": spec.python, "asked": asked, "notes": notes,
            "installed": installed, "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.monotonic() - started, 1),
        }, indent=2))
        try:
            building.rename(runtimes / spec.name)
        except OSError:  # another prepare of the same spec finished first: its runtime serves
            shutil.rmtree(building, ignore_errors=True)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    runtime = runtimes / spec.name
    say(f"runtime {spec.name} ready in {time.monotonic() - started:.0f} s: " +
        ", ".join(f"{name} {installed[name]}" for name in ("monai", "torch", "numpy") if name in installed))
    return runtime


def _install(python: Path, spec: RuntimeSpec, say: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """Run pip until an attempt succeeds; what was asked, and what had to give way."""
    notes: list[str] = []
    tried: list[list[str]] = []
    for pins, described in ATTEMPTS:
        requirements = spec.requirements(pins)
        if requirements in tried:
            continue
        tried.append(requirements)
        say(f"installing {described}: {' '.join(requirements)}")
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--prefer-binary",
             "--only-binary", BINARY_ONLY, *requirements],
            capture_output=True, text=True, timeout=PIP_SECONDS, check=False)
        if result.returncode == 0:
            return requirements, notes
        refusal = _refusal(result.stdout + result.stderr)
        notes.append(f"pip refused {described}: {refusal}")
        say(f"  pip refused them: {refusal}")
    raise PrepareError("no runtime could be made: " + "; ".join(notes))


def _refusal(output: str) -> str:
    """pip's own reason, from its ERROR lines, or its last line; without the lists of the
    releases it ignored or could have taken, which run to hundreds of versions."""
    errors = [line.strip().split(" (from versions:")[0] for line in output.splitlines()
              if line.startswith("ERROR") and "Ignored the following versions" not in line]
    lines = errors[-3:] or output.strip().splitlines()[-1:] or ["no output"]
    return " / ".join(line[:300] for line in lines)


def _installed(python: Path) -> dict[str, str]:
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                            capture_output=True, text=True, timeout=120, check=True)
    return {package["name"].lower(): package["version"] for package in json.loads(listed.stdout)}


def _remove_abandoned(runtimes: Path, spec: RuntimeSpec) -> None:
    """Half-made runtimes of this spec whose prepare is no longer running."""
    for building in runtimes.glob(f".building-{spec.name}-*"):
        pid = building.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(building, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
