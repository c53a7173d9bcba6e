"""Reading a quiet study's series ahead of completion: read once while nothing changes, read
again when a file of the series is added or rewritten, and let go when the study leaves the
read-ahead window."""

from __future__ import annotations

import os

import pytest

from dicom_node.state import completion
from tests.support.ct_study import StudyInfo, ct_series, make_phantom, write_series


@pytest.fixture
def reads(monkeypatch):
    """Series read from their files, in order (the real reader underneath)."""
    read = []

    def counting(series_uid, paths):
        read.append(series_uid)
        return real(series_uid, paths)

    real = completion.series_stacks
    monkeypatch.setattr(completion, "series_stacks", counting)
    return read


def test_a_series_is_read_again_only_when_its_files_change(tmp_path, reads):
    images = ct_series(make_phantom((16, 16, 6), (2.0, 2.0, 2.0), seed=2), StudyInfo(), 3, "ahead")
    uid = images[0].SeriesInstanceUID
    paths = write_series(images[:5], tmp_path)
    read_ahead = completion.ReadAhead()

    first = read_ahead.series_stacks(uid, paths)
    assert read_ahead.series_stacks(uid, paths) is first
    assert reads == [uid]

    paths = write_series(images, tmp_path)  # a sixth image arrives
    assert read_ahead.series_stacks(uid, paths)[0].images == 6
    assert reads == [uid, uid]

    stat = os.stat(paths[0])  # an image is stored again, changed
    images[0].SeriesDescription = "ahead, corrected"
    write_series(images[:1], tmp_path)
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert read_ahead.series_stacks(uid, paths)[0].images == 6
    assert reads == [uid, uid, uid]


def test_only_series_of_studies_still_quiet_are_kept(tmp_path, reads):
    images = ct_series(make_phantom((16, 16, 3), (2.0, 2.0, 2.0), seed=2), StudyInfo(), 3, "ahead")
    uid = images[0].SeriesInstanceUID
    paths = write_series(images, tmp_path)
    read_ahead = completion.ReadAhead()
    read_ahead.series_stacks(uid, paths)
    read_ahead.retain({uid})
    read_ahead.series_stacks(uid, paths)
    assert reads == [uid]
    read_ahead.retain(set())  # the study completed, or received again
    read_ahead.series_stacks(uid, paths)
    assert reads == [uid, uid]
