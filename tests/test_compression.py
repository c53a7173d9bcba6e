"""Compressed pixel data decodes to the same pixels as the original (lossless), or as DCMTK's
own decoder gives them (lossy JPEG), for every transfer syntax the node accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from dicom_node.volume import load_volume, read_frames
from tests.support.ct_study import StudyInfo, ct_series, make_phantom, write_series

LOSSLESS = {
    "deflated": ["dcmconv", "+td"],
    "rle": ["dcmcrle"],
    "jpeg-lossless-14": ["dcmcjpeg", "+el"],
    "jpeg-lossless-sv1": ["dcmcjpeg", "+e1"],
    "jpeg-ls-lossless": ["dcmcjpls"],  # lossless is its default
    "jpeg-2000-lossless": None,  # DCMTK has no JPEG 2000 codec: pydicom's openjpeg plugin encodes it
}
LOSSY = {"jpeg-baseline": ["dcmcjpeg", "+eb"], "jpeg-extended": ["dcmcjpeg", "+ee"]}


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> list[Path]:
    phantom = make_phantom((96, 80, 4), (3.0, 3.0, 5.0), seed=4)
    return write_series(ct_series(phantom, StudyInfo(), 1, "source"), tmp_path_factory.mktemp("original"))


def convert(paths: list[Path], command: list[str] | None, folder: Path) -> list[Path]:
    folder.mkdir()
    converted = []
    for path in paths:
        target = folder / path.name
        if command is None:
            ds = pydicom.dcmread(path)
            ds.compress(JPEG2000Lossless)
            ds.save_as(target)
        else:
            subprocess.run([*command, str(path), str(target)], check=True, capture_output=True)
        converted.append(target)
    return converted


def volume_of(paths: list[Path]) -> np.ndarray:
    return load_volume(read_frames(paths)).array


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_lossless_syntaxes_decode_to_the_original_pixels(tmp_path, original, syntax):
    compressed = convert(original, LOSSLESS[syntax], tmp_path / syntax)
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID != pydicom.dcmread(original[0]).file_meta.TransferSyntaxUID
    assert np.array_equal(volume_of(compressed), volume_of(original))


@pytest.mark.parametrize("syntax", LOSSY)
def test_lossy_jpeg_decodes_as_dcmtk_decodes_it(tmp_path, original, syntax):
    compressed = convert(original, LOSSY[syntax], tmp_path / syntax)
    reference = convert(compressed, ["dcmdjpeg"], tmp_path / "dcmtk-decoded")
    ours, theirs = volume_of(compressed), volume_of(reference)
    assert not np.array_equal(ours, volume_of(original)), "the lossy copy should differ from the original"
    # Two IJG-lineage decoders may round an inverse DCT differently by one stored unit, never
    # more (8-bit baseline rescales 12-bit CT, so one unit is RescaleSlope HU).
    unit = float(pydicom.dcmread(compressed[0]).get("RescaleSlope", 1))
    assert np.abs(ours - theirs).max() <= unit * 1.0001
    assert np.mean(ours != theirs) < 0.15  # measured: 3 % (8-bit baseline) and 7 % (12-bit extended)
