"""Series selection: images only, every condition, the documented preference."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from dicom_node.config import Pipeline
from dicom_node.rules import select_series, series_facts
from tests.support.ct_study import StudyInfo, ct_series, localizer, make_phantom, write_series


def facts_of(images, folder: Path):
    return series_facts(images[0].SeriesInstanceUID, write_series(images, folder))


@pytest.fixture
def study(tmp_path):
    info = StudyInfo()
    thin = ct_series(make_phantom((32, 32, 10), (2.0, 2.0, 1.0), seed=1), info, 3, "thin")
    thick = ct_series(make_phantom((32, 32, 4), (2.0, 2.0, 2.5), seed=1), info, 2, "thick")
    scout = localizer(info)
    capture = ct_series(make_phantom((32, 32, 1), (2.0, 2.0, 1.0), seed=1), info, 99, "dose")
    for ds in capture:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    return {
        name: facts_of(images, tmp_path / name)
        for name, images in (("thin", thin), ("thick", thick), ("scout", scout), ("dose", capture))
    }


def pipeline(**select) -> Pipeline:
    return Pipeline(name="p", model=Path("m"), select=select)


def test_thinnest_series_wins_and_non_images_are_never_taken(study):
    selection = select_series(pipeline(Modality="CT"), list(study.values()))
    assert selection.chosen is study["thin"]
    assert selection.reasons[study["scout"].series_uid] == "not taken: a localizer"
    assert "not a cross-sectional image series" in selection.reasons[study["dose"].series_uid]
    assert "thinner slices" in selection.reasons[study["thick"].series_uid]


def test_every_condition_must_hold(study):
    selection = select_series(pipeline(Modality="CT", SeriesDescription="thick"), list(study.values()))
    assert selection.chosen is study["thick"]
    assert selection.reasons[study["thin"].series_uid] == "not taken: SeriesDescription is 'thin', not 'thick'"


def test_numbers_compare_as_numbers_and_missing_keywords_fail(study):
    assert select_series(pipeline(SeriesNumber=2), [study["thick"]]).chosen is study["thick"]
    selection = select_series(pipeline(ContrastBolusAgent="IODINE"), [study["thin"]])
    assert selection.chosen is None
    assert selection.reasons[study["thin"].series_uid] == "not taken: ContrastBolusAgent is absent"
