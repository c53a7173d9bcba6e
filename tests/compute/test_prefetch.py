"""Volumes built ahead by an idle worker: the one a job takes equals the one it would have
built, and none is taken when the series' files changed, when another job took it, or for a
series no pipeline wants."""

from __future__ import annotations

import os

import numpy as np
from sqlalchemy import update

from dicom_node.compute.frames import read_frames, split_stacks
from dicom_node.compute.prefetch import VolumePrefetch
from dicom_node.compute.volume import load_volume
from dicom_node.state import db
from tests.support.ct_study import StudyInfo, ct_series, make_phantom
from tests.support.received import stored_by_receiver

STABLE_AFTER = 10.0


def received(tmp_path, images, quiet_for: float):
    """The node's database and files after receiving ``images``, quiet for ``quiet_for`` s."""
    config, engine = stored_by_receiver(tmp_path, images, STABLE_AFTER)
    with engine.begin() as connection:
        connection.execute(update(db.studies).values(last_received_at=db.now() - quiet_for))
    with db.reading(engine) as connection:
        paths = [row.path for row in connection.execute(db.instances.select())]
    return config, engine, paths


def ct(modality: str = "CT"):
    images = ct_series(make_phantom((24, 20, 7), (1.5, 1.5, 3.0), seed=5), StudyInfo(), 2, "ahead")
    for image in images:
        image.Modality = modality
    return images


def test_the_volume_built_ahead_is_the_one_the_job_would_build(tmp_path):
    images = ct()
    config, engine, paths = received(tmp_path, images, quiet_for=STABLE_AFTER * 0.6)
    prefetch = VolumePrefetch(config, engine)
    prefetch.build_ahead()
    series_uid = images[0].SeriesInstanceUID
    ahead = prefetch.take(series_uid, "", paths)
    assert ahead is not None
    direct = load_volume(split_stacks(read_frames(paths))[""])
    np.testing.assert_array_equal(ahead.array, direct.array)
    np.testing.assert_array_equal(ahead.affine_ras, direct.affine_ras)
    assert [f.sop_instance_uid for f in ahead.frames] == [f.sop_instance_uid for f in direct.frames]
    assert prefetch.take(series_uid, "", paths) is None  # given to one job only


def test_nothing_is_taken_once_a_file_of_the_series_changed(tmp_path):
    images = ct()
    config, engine, paths = received(tmp_path, images, quiet_for=STABLE_AFTER * 0.6)
    prefetch = VolumePrefetch(config, engine)
    prefetch.build_ahead()
    stat = os.stat(paths[3])
    os.utime(paths[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # stored again
    assert prefetch.take(images[0].SeriesInstanceUID, "", paths) is None
    assert prefetch.take(images[0].SeriesInstanceUID, "", paths[:-1]) is None  # or one file fewer


def test_only_studies_quiet_long_enough_and_series_a_pipeline_takes(tmp_path):
    images = ct()
    config, engine, paths = received(tmp_path / "arriving", images, quiet_for=STABLE_AFTER * 0.2)
    prefetch = VolumePrefetch(config, engine)
    prefetch.build_ahead()
    assert prefetch.take(images[0].SeriesInstanceUID, "", paths) is None  # may still be arriving

    images = ct(modality="MR")
    config, engine, paths = received(tmp_path / "mr", images, quiet_for=STABLE_AFTER * 0.6)
    prefetch = VolumePrefetch(config, engine)
    prefetch.build_ahead()
    assert prefetch.take(images[0].SeriesInstanceUID, "", paths) is None  # no pipeline takes MR
