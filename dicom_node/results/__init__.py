"""Result encoders: model output to standard DICOM objects (SEG, SR)."""

from io import BytesIO

from pydicom import Dataset


def file_bytes(dataset: Dataset) -> bytes:
    """A result as the DICOM file (Part 10, with its meta header) that is stored and sent."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
