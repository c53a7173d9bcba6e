"""Instance files on disk: written once, atomically and durably, never modified.

A file is the truth for pixels. It is written to a temporary name, flushed to the disk and
renamed into place, so that after a power cut a file is whole, under its final name or its
temporary one, or absent; never partial. `write_durably` also flushes the folder, so the file
is under its final name. A received instance takes one flush instead of three
(`IncomingFiles`): its temporary name is made durable in advance, and a rename the power cut
took is done again at the next start (`recovery`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

# A UID as PS3.5 9.1 defines it: numeric components separated by single dots, none empty, none
# with a leading zero unless it is "0". `fullmatch`, not `match` with `$`, which lets a
# trailing newline through.
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
MAX_UID_LENGTH = 64


def is_valid_uid(uid: str) -> bool:
    return len(uid) <= MAX_UID_LENGTH and _UID.fullmatch(uid) is not None


def _safe_uid(uid: str) -> str:
    """UIDs become path parts: a valid UID has no separator and is never "." or ".."."""
    if not is_valid_uid(uid):
        raise ValueError(f"not a valid DICOM UID: {uid!r}")
    return uid


def _uid_path(root: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    path = root / _safe_uid(study_uid) / _safe_uid(series_uid) / f"{_safe_uid(sop_instance_uid)}.dcm"
    # The UID check alone keeps the path inside; this second lock holds if that check changes.
    if os.path.commonpath([os.path.abspath(root), os.path.abspath(path)]) != os.path.abspath(root):
        raise ValueError(f"{path} is not under {root}")
    return path


def instance_path(data_dir: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """Where a received instance lives: data_dir/studies/STUDY/SERIES/INSTANCE.dcm."""
    return _uid_path(data_dir / "studies", study_uid, series_uid, sop_instance_uid)


def result_path(data_dir: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """Where a result the node made lives: data_dir/results/STUDY/SERIES/INSTANCE.dcm."""
    return _uid_path(data_dir / "results", study_uid, series_uid, sop_instance_uid)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(folder: Path) -> None:
    """Create missing folders, each one's entry flushed in its parent, top down."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        fsync_dir(created.parent)


def _write_flushed(fd: int, content: bytes) -> None:
    """Write all of ``content`` to ``fd``, flush its data and size to the disk, and close it.
    (Only the data and what reading it back needs: the file's times may lag after a crash.)"""
    try:
        view = memoryview(content)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fdatasync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, content: bytes) -> None:
    """Write ``content`` at ``path`` so that it survives a crash once this returns."""
    folder = path.parent
    make_dirs_durably(folder)
    temporary = folder / f".{path.name}.{os.getpid()}.{id(content)}.tmp"
    try:
        _write_flushed(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), content)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    rename_durably(temporary, path)


def rename_durably(source: Path | str, path: Path) -> None:
    """Rename a flushed file to ``path``, in an existing folder, and flush the folder: once this
    returns the file is under its new name even after a power cut."""
    os.replace(source, path)
    fsync_dir(path.parent)


def free_mb(folder: Path) -> float:
    """Free space (MB) for an unprivileged writer on the filesystem of ``folder``."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize / 1e6


def purge_marker(data_dir: Path) -> Path:
    """A file whose change tells every receiver that retention removed rows and folders: what
    they remember of studies (`Receiver`) and folders (`IncomingFiles`) may be gone."""
    return data_dir / "purged-at"


def mark_purged(data_dir: Path) -> None:
    marker = purge_marker(data_dir)
    marker.write_text(f"{time.time()}\n")


def purge_stamp(data_dir: Path) -> int:
    """The marker's modification time (ns), 0 before the first purge."""
    try:
        return os.stat(purge_marker(data_dir)).st_mtime_ns
    except FileNotFoundError:
        return 0


def incoming_folder(data_dir: Path, instance: str) -> Path:
    """Where the node ``instance`` (`Config.instance_name`) writes received instances before
    they are renamed into place: a folder of its own, as nodes sharing a data_dir each recover
    only what they left there."""
    return data_dir / "incoming" / instance


SLOT_SUFFIX = ".slot"
MAX_REMEMBERED_FOLDERS = 10_000


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class IncomingFile:
    """A made-ahead file in the incoming folder, open for writing and reading back."""

    def __init__(self, slot: str, descriptor: int) -> None:
        self.slot = slot
        self.descriptor = descriptor
        self.size = 0

    def write(self, content) -> None:
        view = memoryview(content)
        self.size += len(view)
        while view:
            written = os.write(self.descriptor, view)
            view = view[written:]

    def close(self) -> None:
        if self.descriptor >= 0:
            os.close(self.descriptor)
            self.descriptor = -1


class IncomingFiles:
    """Received instances written durably with one flush each, for the receiver's hot path.

    `write_durably` flushes three times: the file, its folder after the rename, and (in the
    receiver) the index commit. Here empty files are made in the incoming folder ahead of need,
    a batch at a time with one flush of the folder, so their names are durable before any
    content. An instance is written into one, flushed (data and size: the one flush) and
    renamed into place without flushing the folder. After a power cut, the instance is whole
    either where it belongs or still in the incoming folder, where start-up finds it
    (`recovery.recover_incoming`).

    Files are made by a thread of their own, a batch at a time, whenever fewer than a batch
    are left, so that a C-STORE waits for them only when instances arrive faster than files
    can be made. Refilling at half a batch was not enough: with four associations the folder's
    flush, queued behind the instances' own, outlasted the half batch, and the receiving
    threads took turns waiting, each ask waking all of them (a tenth of the receiver's time).
    Now an ask wakes only the maker, and a made batch only the threads waiting for it.
    """

    def __init__(self, folder: Path, batch: int = 64) -> None:
        self.folder = folder
        self.batch = batch
        self._made = 0
        lock = threading.Lock()
        self._files_made = threading.Condition(lock)  # what receiving threads wait for
        self._files_wanted = threading.Condition(lock)  # what the maker waits for
        self._wanted = False
        self._failure: OSError | None = None
        self._closed = False
        self._folders: set[str] = set()  # series folders known to exist
        make_dirs_durably(folder)
        self._free = self._make_batch()
        self._maker = threading.Thread(target=self._make_ahead, name=f"files ahead in {folder}", daemon=True)
        self._maker.start()

    def write(self, path: Path, content: bytes) -> None:
        """Write ``content`` at ``path`` so that it survives a crash once this returns (at
        ``path``, or in the incoming folder until the next start)."""
        incoming = self.open()
        try:
            incoming.write(content)
        except BaseException:
            self.discard(incoming)
            raise
        self.keep(incoming, path)

    def open(self) -> IncomingFile:
        """A file made ahead, opened to be written a part at a time (an instance too large to
        hold in memory), then kept (`keep`) or discarded (`discard`)."""
        while True:
            slot = self._take()
            with contextlib.suppress(FileNotFoundError):  # removed behind the node's back: passed over
                return IncomingFile(slot, os.open(slot, os.O_RDWR))

    def keep(self, incoming: IncomingFile, path: Path) -> None:
        """Flush ``incoming`` and move it to ``path``: it survives a crash once this returns."""
        folder = str(path.parent)
        try:
            if folder not in self._folders:
                self._make_folder(path.parent)
            os.fdatasync(incoming.descriptor)
            try:
                os.replace(incoming.slot, path)
            except FileNotFoundError:  # retention removed the folder of a finished study since
                self._make_folder(path.parent)
                os.replace(incoming.slot, path)
        except BaseException:
            self._folders.discard(folder)  # removed behind the node's back, perhaps: looked at again
            self.discard(incoming)  # half written: never offered again
            raise
        incoming.close()

    def _make_folder(self, folder: Path) -> None:
        make_dirs_durably(folder)
        if len(self._folders) >= MAX_REMEMBERED_FOLDERS:
            self._folders.clear()
        self._folders.add(str(folder))

    def forget_folders(self) -> None:
        """Retention removed folders: each is looked at again before its next file."""
        self._folders = set()

    def discard(self, incoming: IncomingFile) -> None:
        incoming.close()
        _remove(incoming.slot)

    def _take(self) -> str:
        """A file made ahead; the OSError that stopped the maker if none is left."""
        with self._files_made:
            while not self._free:
                if self._failure is not None:
                    failure, self._failure = self._failure, None  # the next caller tries again
                    raise failure
                if self._closed:
                    raise OSError(f"no more files are made in {self.folder}: the receiver stopped")
                self._ask_for_more()
                self._files_made.wait()
            slot = self._free.pop()
            if len(self._free) < self.batch:
                self._ask_for_more()
            return slot

    def _ask_for_more(self) -> None:
        if not self._wanted:
            self._wanted = True
            self._files_wanted.notify()

    def _make_ahead(self) -> None:
        while True:
            with self._files_wanted:
                while not (self._wanted or self._closed):
                    self._files_wanted.wait()
                if self._closed:
                    return
            try:
                made = self._make_batch()
            except OSError as error:
                log.error("cannot make files for received instances in %s: %s", self.folder, error)
                made, failure = [], error
            else:
                failure = None
            with self._files_made:
                self._free = made + self._free
                self._failure = failure
                self._wanted = False  # asked again by the next take if still short
                self._files_made.notify_all()

    def _make_batch(self) -> list[str]:
        """Names as strings: building paths for every instance cost more than the rest here."""
        made: list[str] = []
        prefix = f"{self.folder}/{os.getpid()}-"
        try:
            while len(made) < self.batch:
                self._made += 1
                slot = f"{prefix}{self._made}{SLOT_SUFFIX}"
                try:  # a name left by an earlier process with this pid is not ours to empty
                    os.close(os.open(slot, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                except FileExistsError:
                    continue
                made.append(slot)
            fsync_dir(self.folder)
        except OSError:
            for slot in made:
                _remove(slot)
            raise
        return made

    def close(self) -> None:
        """Stop making files, and remove those made and not used."""
        with self._files_made:
            self._closed = True
            self._files_made.notify_all()
            self._files_wanted.notify()
        self._maker.join()
        with self._files_made:
            for slot in self._free:
                _remove(slot)
            self._free = []
