"""Received files the index lost in a power cut, indexed again before the node receives.

The receiver answers a C-STORE once the instance's file is durably on disk (`store`), but it
commits the instance's index rows without waiting for the disk to have them: that saves a
flush per instance, a third of what storing a small image costs. A killed process loses none
of those commits (they are in the operating system's cache), but a crash of the operating
system or a power cut can lose the last ones. Files are the truth for what was received, so
after every boot of the machine, before the receivers start, the files under
``data_dir/studies`` are compared with the index and each file it does not know is indexed
from its own header, as if it had just arrived.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
from sqlalchemy import Engine, text

from . import db, store
from .config import Config
from .driver_sql import DriverConnection
from .index import InstanceIndex, described, header_of, instance_row

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
CHECKED_MARKER = "index-checked-at-boot"  # in data_dir: the boot after which the index was last checked


def current_boot() -> str | None:
    """This boot of the machine, or None where the system does not say (then every start checks)."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def reindex_after_boot(config: Config, engine: Engine, boot: str | None) -> int | None:
    """Index the files the index lost, once per ``boot`` of the machine: a restart of the node
    alone cannot have lost a commit, so it skips the walk over every stored file. Returns how
    many files were indexed again, or None when this boot was checked already."""
    marker = config.node.data_dir / CHECKED_MARKER
    if boot is not None and marker.is_file() and marker.read_text().strip() == boot:
        return None
    started = time.monotonic()
    found, indexed = reindex_lost_files(config, engine)
    log.log(
        logging.WARNING if indexed else logging.INFO,
        "checked the index against %d stored files in %.1f s: %d were missing and are indexed again",
        found, time.monotonic() - started, indexed,
    )
    if boot is not None:
        store.write_durably(marker, boot.encode())
    return indexed


def reindex_lost_files(config: Config, engine: Engine) -> tuple[int, int]:
    """Index every stored instance file missing from the index; remove temporary files a crash
    left (their C-STOREs were never answered). Returns (files found, files indexed)."""
    with db.reading(engine) as connection:
        known = {uid for (uid,) in connection.execute(text("SELECT sop_instance_uid FROM instances"))}
    connection = DriverConnection(engine)
    instances = InstanceIndex(connection, config.node.late_arrivals)
    found = indexed = 0
    try:
        for series_folder, names in _series_folders(config.node.data_dir / "studies"):
            lost = []
            for name in names:
                if name.startswith(".") and name.endswith(".tmp"):
                    (series_folder / name).unlink(missing_ok=True)
                elif name.endswith(".dcm"):
                    found += 1
                    if name.removesuffix(".dcm") not in known:
                        lost.append(series_folder / name)
            rows = [row for row in map(_rows_of_file, lost) if row is not None]
            if rows:
                with connection.transaction() as cursor:
                    indexed += sum(instances.record(cursor, header, instance) for header, instance in rows)
    finally:
        connection.close()
    return found, indexed


def _series_folders(studies: Path) -> Iterator[tuple[Path, list[str]]]:
    """Each STUDY/SERIES folder of the instance store, with the names of the files in it."""
    if not studies.is_dir():
        return
    for study in os.scandir(studies):
        if study.is_dir():
            for series in os.scandir(study.path):
                if series.is_dir():
                    yield Path(series.path), os.listdir(series.path)


def _rows_of_file(path: Path):
    """The header and instances row of a stored file, or None (logged) for one that cannot be
    indexed; it stays where it is, for an operator to look at."""
    try:
        content = path.read_bytes()
        dataset = pydicom.dcmread(BytesIO(content), stop_before_pixels=True)
        header = header_of(dataset)
        transfer_syntax = str(dataset.file_meta.TransferSyntaxUID)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported, none stops the check
        log.error("stored file %s cannot be indexed: %s", path, error)
        return None
    if header is None or path.name != f"{header.sop_instance_uid}.dcm":
        log.error("stored file %s cannot be indexed: its UIDs are missing, invalid or not its name", path)
        return None
    received_at = path.stat().st_mtime
    return described(header, dataset), instance_row(header, path, content, transfer_syntax, None, received_at)
