"""Instance files on disk: written once, atomically and durably, never modified.

A file is the truth for pixels. It is written to a temporary name in its final folder, flushed
to the disk, renamed into place and the folder flushed too, so that after a power cut a file is
either whole under its final name or absent; never partial.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_UID = re.compile(r"^[0-9.]{1,64}$")


def is_valid_uid(uid: str) -> bool:
    return bool(_UID.match(uid))


def _safe_uid(uid: str) -> str:
    """UIDs become path parts; anything but digits and dots would be a path injection."""
    if not is_valid_uid(uid):
        raise ValueError(f"not a valid DICOM UID: {uid!r}")
    return uid


def _uid_path(root: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    return root / _safe_uid(study_uid) / _safe_uid(series_uid) / f"{_safe_uid(sop_instance_uid)}.dcm"


def instance_path(data_dir: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """Where a received instance lives: data_dir/studies/STUDY/SERIES/INSTANCE.dcm."""
    return _uid_path(data_dir / "studies", study_uid, series_uid, sop_instance_uid)


def result_path(data_dir: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """Where a result the node made lives: data_dir/results/STUDY/SERIES/INSTANCE.dcm."""
    return _uid_path(data_dir / "results", study_uid, series_uid, sop_instance_uid)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durably(folder: Path) -> None:
    """Create missing folders, each one's entry flushed in its parent, top down."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        _fsync_dir(created.parent)


def write_durably(path: Path, content: bytes) -> None:
    """Write ``content`` at ``path`` so that it survives a crash once this returns."""
    folder = path.parent
    _make_dirs_durably(folder)
    temporary = folder / f".{path.name}.{os.getpid()}.{id(content)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(content)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temporary, path)
    _fsync_dir(folder)
