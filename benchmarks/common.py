"""Shared pieces of the benchmarks: payloads, peers, CPU time and peak memory of a process tree,
and a table printer."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Self

import numpy as np
import psutil
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.peers import dcmtk_env, free_port, start_node, start_orthanc, wait_for, write_node_config  # noqa: F401


def write_ct(folder: Path, slices: int, size: int, series_description: str = "benchmark") -> list[Path]:
    """A CT series of ``slices`` images of ``size`` x ``size``, uncompressed 16-bit, fast to make."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(slices * 7 + size)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    base = rng.integers(0, 2000, size=(size, size), dtype=np.uint16)
    paths = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "BENCH^MARK", "CT"
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = series_description, 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-200, -200, k * 1.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [400 / size, 400 / size]
        ds.SliceThickness = 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.roll(base, k, axis=0).tobytes()
        path = folder / f"{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(ae_title: str, port: int, paths: list[Path], associations: int, options: Collection[str] = ()) -> float:
    """Seconds for ``associations`` concurrent storescu processes to send ``paths`` between them
    (with storescu's ``options``: TLS, say)."""
    chunks = [chunk for chunk in (paths[i::associations] for i in range(associations)) if chunk]
    started = time.perf_counter()
    senders = [
        subprocess.Popen(["storescu", *options, "-aec", ae_title, "127.0.0.1", str(port), *map(str, chunk)],
                         env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for chunk in chunks
    ]
    for sender in senders:
        _, errors = sender.communicate()
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {errors.decode()[-500:]}")
    return time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and all under it, including the children it has already reaped
    (storescp forks one per association)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


class PeakMemory:
    """The most resident memory a process tree used while the ``with`` block ran, in MB: the sum
    over its processes of each one's high-water mark (VmHWM, the kernel's record of a process's
    peak, so no short peak is missed between looks). Peaks reached at different moments add up,
    shared pages count once per process, and a process's peak may predate the block: the sum
    errs high, never low. Children are looked for every 50 ms, which costs about 1 ms; one that
    lives less than that may be missed. Each process's peak is kept apart, so that one look
    serves any split of the tree (`peak_mb`, `peak_mb_of`)."""

    INTERVAL_SECONDS = 0.05

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self._peaks: dict[int, int] = {}  # pid -> its high-water mark, bytes
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def peak_mb(self, leave_out: Collection[int] = ()) -> float:
        """The tree's, without the processes in ``leave_out``."""
        return sum(peak for pid, peak in self._peaks.items() if pid not in leave_out) / 2**20

    def peak_mb_of(self, pids: Collection[int]) -> float:
        """Only that of the processes in ``pids``."""
        return sum(peak for pid, peak in self._peaks.items() if pid in pids) / 2**20

    def _look(self) -> None:
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
            if match:
                self._peaks[process.pid] = max(self._peaks.get(process.pid, 0), int(match.group(1)) * 1024)

    def _sample(self) -> None:
        while True:
            self._look()
            if self._stop.wait(self.INTERVAL_SECONDS):
                return

    def __enter__(self) -> Self:
        self._sampler.start()
        return self

    def __exit__(self, *_exception) -> None:
        self._stop.set()
        self._sampler.join()
        self._look()


def file_creation_microseconds(folder: Path, count: int = 300) -> float:
    """Mean time to create an empty file in ``folder``. On ext4 without a journal it jumps from
    about 0.03 to 0.15-0.5 ms for minutes after thousands of files were deleted (the inode
    allocator looks up each recently freed inode): a benchmark prints it, so that a run slowed
    that way shows it. The files stay, since deleting them is what makes creations slow."""
    folder.mkdir(parents=True)
    started = time.perf_counter()
    for index in range(count):
        (folder / f"{index}").touch(exist_ok=False)
    return (time.perf_counter() - started) / count * 1e6


def table(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
