"""Pixels read from a file's tail are pydicom's own values, or the shortcut steps aside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from dicom_node.compute.native_pixels import read_native_pixels


def _image(stored: np.ndarray, bits_stored: int, signed: bool, transfer_syntax: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    frames, ds.Rows, ds.Columns = stored.shape
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = stored.tobytes()
    return ds


def _round_trip(tmp_path: Path, ds: Dataset) -> tuple[np.ndarray | None, np.ndarray]:
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    reference = pydicom.dcmread(path).pixel_array
    return read_native_pixels(path, header), reference.reshape(-1, *reference.shape[-2:])


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(
    ("dtype", "bits_stored", "frames", "rows", "columns"),
    [
        (np.uint16, 12, 1, 7, 9),  # unused high bits set: masked
        (np.int16, 12, 1, 8, 6),  # negative 12-bit values: sign-extended
        (np.int16, 16, 3, 5, 4),  # multi-frame
        (np.uint8, 8, 1, 3, 5),  # odd length, padded
        (np.int8, 7, 2, 3, 3),
    ],
)
def test_tail_equals_pydicom(tmp_path, transfer_syntax, dtype, bits_stored, frames, rows, columns) -> None:
    rng = np.random.default_rng(bits_stored + frames)
    info = np.iinfo(dtype)
    stored = rng.integers(info.min, info.max, size=(frames, rows, columns), endpoint=True).astype(dtype)
    pixels, reference = _round_trip(tmp_path, _image(stored, bits_stored, info.min < 0, transfer_syntax))
    assert pixels is not None, "the shortcut did not apply"
    assert pixels.dtype == reference.dtype
    assert np.array_equal(pixels, reference)


def test_element_after_pixel_data_is_left_to_pydicom(tmp_path) -> None:
    ds = _image(np.arange(12, dtype=np.uint16).reshape(1, 3, 4), 16, False, ExplicitVRLittleEndian)
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 8)  # Data Set Trailing Padding
    pixels, _ = _round_trip(tmp_path, ds)
    assert pixels is None


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRBigEndian, RLELossless])
def test_other_encodings_are_left_to_pydicom(tmp_path, transfer_syntax) -> None:
    ds = _image(np.arange(12, dtype=np.uint16).reshape(1, 3, 4), 16, False, ExplicitVRLittleEndian)
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert read_native_pixels(path, pydicom.dcmread(path, stop_before_pixels=True)) is None
