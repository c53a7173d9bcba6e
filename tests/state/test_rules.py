"""Series selection: images only, the rule syntax, preferences, and `dicom-node explain`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom.uid import SecondaryCaptureImageStorage

from dicom_node.config import Pipeline
from dicom_node.state.rules import plane_of, select_series, series_stacks
from tests.support.ct_study import StudyInfo, ct_series, localizer, make_phantom, write_series
from tests.support.peers import start_node, storescu, wait_for, write_node_config


def stacks_of(images, folder: Path):
    return series_stacks(images[0].SeriesInstanceUID, write_series(images, folder))


def study_images(info: StudyInfo) -> dict[str, list]:
    """A localizer, a thin and a thick reconstruction, a derived MPR and a dose screen capture."""
    thin = ct_series(make_phantom((32, 32, 10), (2.0, 2.0, 1.0), seed=1), info, 3, "Abdomen 1.0 mm")
    thick = ct_series(make_phantom((32, 32, 4), (2.0, 2.0, 2.5), seed=1), info, 2, "Abdomen 2.5 mm")
    derived = ct_series(make_phantom((32, 32, 12), (2.0, 2.0, 0.8), seed=1), info, 4, "MPR",
                        ("DERIVED", "SECONDARY", "AXIAL"))
    dose = ct_series(make_phantom((32, 32, 1), (2.0, 2.0, 1.0), seed=1), info, 99, "Dose Report")
    for ds in dose:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    return {"scout": localizer(info), "thin": thin, "thick": thick, "derived": derived, "dose": dose}


@pytest.fixture
def study(tmp_path):
    return {name: stacks_of(images, tmp_path / name)[0] for name, images in study_images(StudyInfo()).items()}


def pipeline(select, **options) -> Pipeline:
    return Pipeline(name="p", model=Path("m"), select=select, **options)


def test_non_images_are_never_taken_and_the_thinnest_original_wins(study):
    rule = {"Modality": "CT", "ImageType": {"contains": ["AXIAL"], "excludes": ["DERIVED"]}}
    selection = select_series(pipeline(rule), list(study.values()))
    assert selection.chosen == [study["thin"]]
    reasons = selection.reasons
    assert reasons[study["scout"].key] == "not taken: a localizer"
    assert "not a cross-sectional image series" in reasons[study["dose"].key]
    assert reasons[study["derived"].key] == "not taken: ImageType 'DERIVED\\\\SECONDARY\\\\AXIAL' contains DERIVED"
    assert "thinner slices" in reasons[study["thick"].key]


@pytest.mark.parametrize(
    "rule, expected",
    [
        ({"SeriesDescription": {"regex": "abdomen 2\\.5 MM", "ignore_case": True}}, "thick"),
        ({"SeriesDescription": {"regex": "abdomen 2\\.5 MM"}}, None),  # case matters by default
        ({"SeriesDescription": {"regex": "Abdomen"}}, None),  # a full match, not a search
        ({"slice_spacing": {"min": 2.0, "max": 3.0}}, "thick"),
        ({"images": {"min": 11}}, "derived"),
        ({"SeriesNumber": {"in": [2, 4]}, "ImageType": {"excludes": ["DERIVED"]}}, "thick"),
        ({"SeriesDescription": {"not": ["Abdomen 1.0 mm", "MPR"]}}, "thick"),
        ({"orientation": "axial", "uniform_spacing": True, "SeriesNumber": 3}, "thin"),
        ({"orientation": "sagittal"}, None),
    ],
)
def test_rule_operators(study, rule, expected):
    chosen = select_series(pipeline(rule), list(study.values())).chosen
    assert chosen == ([study[expected]] if expected else [])


def test_alternatives_preferences_and_take_all(study):
    either = [{"SeriesNumber": 2}, {"SeriesNumber": 4}]
    assert select_series(pipeline(either), list(study.values())).chosen == [study["derived"]]
    by_images = select_series(pipeline(either, prefer="most_images"), list(study.values())).chosen
    assert by_images == [study["derived"]]
    both = select_series(pipeline(either, take="all"), list(study.values())).chosen
    assert set(s.series_uid for s in both) == {study["derived"].series_uid, study["thick"].series_uid}
    failing = select_series(pipeline([{"SeriesNumber": 7}, {"Modality": "MR"}]), [study["thin"]])
    assert failing.reasons[study["thin"].key] == (
        "not taken: alternative 1: SeriesNumber is '3', not 7; alternative 2: Modality is 'CT', not 'MR'"
    )


def test_invalid_rules_are_refused_when_the_configuration_loads():
    with pytest.raises(ValidationError, match="invalid regex"):
        pipeline({"SeriesDescription": {"regex": "("}})
    with pytest.raises(ValidationError, match="needs one of"):
        pipeline({"SeriesDescription": {"ignore_case": True}})


def test_planes_are_named_from_the_normal():
    assert [plane_of(n) for n in ([0, 0, 1], [0, -1, 0], [1, 0, 0], [0.5, 0.5, 0.7])] == [
        "axial", "coronal", "sagittal", "oblique"
    ]


def test_explain_says_why_for_each_series(tmp_path, node_port):
    info = StudyInfo()
    paths = [p for name, images in study_images(info).items() for p in write_series(images, tmp_path / name)]
    config = write_node_config(
        tmp_path / "node", node_port, destinations=[],
        pipelines=[{"name": "thin-originals", "model": str(tmp_path / "no-such-bundle"),
                    "select": {"Modality": "CT", "ImageType": {"contains": ["AXIAL"], "excludes": ["DERIVED"]}}}],
        stable_after=60, min_free_disk_mb=0,
    )
    node = start_node(config, node_port)
    try:
        assert storescu(node.ae_title, node.port, paths).returncode == 0
        wait_for(lambda: node.query("SELECT count(*) FROM instances") == [(len(paths),)], 30, "all instances")
        lines = node.cli("explain", info.study_uid).splitlines()
    finally:
        node.stop()
    assert lines[1] == "pipeline thin-originals (take one, prefer thinnest)"
    by_series = {line.split("'")[1]: line for line in lines[2:]}
    assert by_series["Abdomen 1.0 mm"].endswith(": taken")
    assert "(10 images, axial, 1.00 mm)" in by_series["Abdomen 1.0 mm"]
    assert by_series["Topogram"].endswith("not taken: a localizer")
    assert "not a cross-sectional image series" in by_series["Dose Report"]
    assert "contains DERIVED" in by_series["MPR"]
    assert "has thinner slices" in by_series["Abdomen 2.5 mm"]
