"""Compressed pixel data decodes to the same pixels as the original (lossless), or as DCMTK's
own decoder gives them (lossy JPEG), for every transfer syntax the node accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from dicom_node.compute.frames import GeometryError, read_frames
from dicom_node.compute.volume import _as_frames, load_volume
from tests.support.ct_study import StudyInfo, ct_series, enhanced_ct, make_phantom, write_series

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
    # Two IJG-lineage decoders may round an inverse DCT differently, by a stored unit or two
    # (measured: at most one for 8-bit baseline, which rescales 12-bit CT so that one unit is
    # RescaleSlope HU; two at a few pixels of a 12-bit extended image).
    unit = float(pydicom.dcmread(compressed[0]).get("RescaleSlope", 1))
    assert np.abs(ours - theirs).max() <= 2 * unit * 1.0001
    assert np.mean(ours != theirs) < 0.15  # measured: 3 % (8-bit baseline) and 7 % (12-bit extended)


def enhanced_instance(folder: Path, hu: np.ndarray, syntax) -> Path:
    """One axial Enhanced CT instance of ``hu`` (one frame a slice), compressed by pydicom."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    ds = enhanced_ct(hu, affine, StudyInfo(), 5, list(range(hu.shape[2])))
    ds.compress(syntax)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hu.shape[2]}-{syntax.name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg-2000-lossless"])
@pytest.mark.parametrize("frames", [1, 3])
def test_compressed_multi_frame_instances_of_one_frame_or_more_decode_frame_by_frame(tmp_path, syntax, frames):
    """pydicom decodes a compressed instance of Number of Frames 1 to (rows, columns): each
    frame must still be the whole image, not one of its rows spread over it."""
    hu = np.random.default_rng(frames).integers(-1000, 2000, size=(64, 48, frames)).astype(np.float32)
    path = enhanced_instance(tmp_path, hu, syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(load_volume(read_frames([path])).array, hu)


def test_decoded_pixels_that_do_not_fit_the_header_are_refused(tmp_path, original):
    [frame] = read_frames(original[:1])
    with pytest.raises(GeometryError, match="decoded pixels of shape"):
        _as_frames(np.zeros((frame.shape[0] + 1, frame.shape[1])), frame)
    assert _as_frames(np.zeros(frame.shape), frame).shape == (1, *frame.shape)
