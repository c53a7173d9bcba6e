"""Received instances whose rename or index rows a power cut took, put back before the node
receives.

The receiver answers a C-STORE once the instance's content is durably on disk, but flushes
neither the rename into its folder (`files.IncomingFiles`) nor its index rows: each flush
saved is a third of what storing a small image costs. A killed process loses none of that work
(it is in the operating system's cache); a crash of the operating system or a power cut can
lose the last of it. Files are the truth for what was received, so before the receivers start:

- every start, files left in the incoming folder are renamed into place and indexed (after a
  crash of the node alone, they are writes whose C-STORE was never answered; whole ones are
  kept all the same, unreadable ones removed);
- after every boot of the machine, the files under ``data_dir/studies`` are compared with the
  index, and each file it does not know is indexed from its own header, as if it had just
  arrived.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import Dataset
from sqlalchemy import Engine, select, text

from dicom_node.config import Config
from dicom_node.ingest.driver_connection import DriverConnection
from dicom_node.ingest.index import (
    InstanceHeader,
    InstanceIndex,
    content_digest,
    described,
    header_of,
    instance_row,
)
from dicom_node.state import db, files

log = logging.getLogger(__name__)

UNDEFINED_LENGTH = 0xFFFFFFFF
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0, little endian
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
        files.write_durably(marker, boot.encode())
    return indexed


def recover_incoming(config: Config, engine: Engine) -> int:
    """Rename into place, durably, and index the instances left in the incoming folder; remove
    the files made ahead and never written, and writes cut short. Returns how many were kept.
    Only this node's folder, and the files that a node of an earlier version left directly in
    the incoming folder: the folders of other nodes sharing the data_dir are theirs, in use."""
    folder = files.incoming_folder(config.node.data_dir, config.instance_name)
    left = [slot for place in (folder, folder.parent) if place.is_dir() for slot in place.iterdir() if slot.is_file()]
    placed = []
    for slot in sorted(left, key=_written_order):
        if slot.stat().st_size == 0:
            slot.unlink()
            continue
        read = _read(slot, whole=True)
        if read is None:
            # Flushed content is whole, so this write was cut short before its flush, and
            # before its C-STORE was answered: the sender was told nothing was stored.
            log.warning("removed %s: an unanswered write that a crash cut short", slot)
            slot.unlink()
            continue
        content, dataset, header = read
        path = files.instance_path(config.node.data_dir, header.study_uid, header.series_uid,
                                   header.sop_instance_uid)
        files.make_dirs_durably(path.parent)
        files.rename_durably(slot, path)
        placed.append(_rows(path, content, dataset, header))
    if placed:
        with _index(config, engine) as record:
            record(placed)
        log.warning("%d received instances were still in %s: renamed into place and indexed", len(placed), folder)
    return len(placed)


def _written_order(slot: Path) -> tuple[int, int, int]:
    """Oldest write first, so that of two versions of one instance the newer is indexed last
    and wins; files made ahead (``PID-N.slot``) in the order they were made where their times
    are equal. Names compared as text put ``9-10`` before ``9-9``."""
    pid, _, number = slot.name.removesuffix(files.SLOT_SUFFIX).partition("-")
    numbers = [int(part) if part.isdigit() else 0 for part in (pid, number)]
    return slot.stat().st_mtime_ns, *numbers


def remove_unrecorded_results(config: Config, engine: Engine, study_uids: set[str]) -> int:
    """Remove the result files of these studies that no result row names: a worker killed
    between writing its results and committing their rows left them, and nothing would ever
    send or delete them. Only the studies whose jobs were interrupted are looked at, at start-up,
    before any worker runs. Returns how many were removed."""
    removed = 0
    for study_uid in study_uids:
        folder = config.node.data_dir / "results" / study_uid
        if not files.is_valid_uid(study_uid) or not folder.is_dir():
            continue
        with db.reading(engine) as connection:
            recorded = set(connection.execute(
                select(db.results.c.path).join(db.jobs, db.jobs.c.id == db.results.c.job_id)
                .where(db.jobs.c.study_uid == study_uid)).scalars())
        for path in folder.rglob("*.dcm"):
            if str(path) not in recorded:
                path.unlink()
                removed += 1
                log.warning("removed %s: a result written by an interrupted job and never recorded", path)
    return removed


def reindex_lost_files(config: Config, engine: Engine) -> tuple[int, int]:
    """Index every stored instance file missing from the index. Returns (files found, files
    indexed)."""
    with db.reading(engine) as connection:
        known = {uid for (uid,) in connection.execute(text("SELECT sop_instance_uid FROM instances"))}
    found = indexed = 0
    with _index(config, engine) as record:
        for series_folder, names in _series_folders(config.node.data_dir / "studies"):
            stored = [name for name in names if name.endswith(".dcm")]
            found += len(stored)
            lost = [series_folder / name for name in stored if name.removesuffix(".dcm") not in known]
            reads = [(path, _read(path, whole=False)) for path in lost]
            indexed += record([_rows(path, *read) for path, read in reads if read is not None])
    return found, indexed


@contextmanager
def _index(config: Config, engine: Engine) -> Iterator[Callable[[list[tuple[InstanceHeader, dict]]], int]]:
    """A function that indexes rows in one durable transaction and says how many were new, on
    one connection for the whole check."""
    connection = DriverConnection(engine)
    instances = InstanceIndex(connection, config.node.late_arrivals)

    def record(rows: list[tuple[InstanceHeader, dict]]) -> int:
        if not rows:
            return 0
        with connection.transaction() as cursor:
            return sum(instances.record(cursor, header, instance).new for header, instance in rows)

    try:
        yield record
    finally:
        connection.close()


def _series_folders(studies: Path) -> Iterator[tuple[Path, list[str]]]:
    """Each STUDY/SERIES folder of the instance store, with the names of the files in it."""
    if not studies.is_dir():
        return
    for study in os.scandir(studies):
        if study.is_dir():
            for series in os.scandir(study.path):
                if series.is_dir():
                    yield Path(series.path), os.listdir(series.path)


def _read(path: Path, whole: bool) -> tuple[bytes, Dataset, InstanceHeader] | None:
    """A stored file's bytes, data set (its pixels too if ``whole``: a file cut short fails
    there) and header; None (logged) for one that cannot be indexed."""
    try:
        content = path.read_bytes()
        dataset = pydicom.dcmread(BytesIO(content), stop_before_pixels=not whole)
        header = header_of(dataset)
        if whole and _cut_short(content, dataset):
            raise EOFError("the file ends inside its last element")
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported, none stops the check
        log.error("stored file %s cannot be indexed: %s", path, error)
        return None
    if header is None or (path.suffix == ".dcm" and path.name != f"{header.sop_instance_uid}.dcm"):
        log.error("stored file %s cannot be indexed: its UIDs are missing, invalid or not its name", path)
        return None
    return content, dataset, header


def _cut_short(content: bytes, dataset: Dataset) -> bool:
    """True for a file that ends before its last element does (pydicom reads what there is).
    A file cut short can end only inside its last element, as read."""
    if not dataset:
        return False
    last = dataset.get_item(max(dataset.keys()))
    length = getattr(last, "length", None)
    if length == UNDEFINED_LENGTH:
        return not content.endswith(SEQUENCE_DELIMITER)
    return length is not None and isinstance(last.value, bytes) and len(last.value) < length


def _rows(path: Path, content: bytes, dataset: Dataset, header: InstanceHeader) -> tuple[InstanceHeader, dict]:
    """The header, with study and series values, and the instances row of a stored file."""
    transfer_syntax = str(dataset.file_meta.TransferSyntaxUID)
    row = instance_row(header, path, len(content), content_digest(content), transfer_syntax, None,
                       path.stat().st_mtime)
    return described(header, dataset), row
