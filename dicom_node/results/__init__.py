"""Result encoders: model output to standard DICOM objects (SEG, SR)."""

from io import BytesIO

import highdicom as hd
from pydicom import Dataset
from pydicom.uid import SegmentationStorage, generate_uid


def file_bytes(dataset: Dataset) -> bytes:
    """A result as the DICOM file (Part 10, with its meta header) that is stored and sent."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def load_standard_tables() -> None:
    """Have highdicom read the standard's module tables now, not in the first job: every
    highdicom object reads them as it is made (0.6 s, once a process), and keeps them."""
    hd.SOPClass(
        study_instance_uid=generate_uid(), series_instance_uid=generate_uid(), series_number=1,
        sop_instance_uid=generate_uid(), sop_class_uid=SegmentationStorage, instance_number=1, modality="SEG",
    )
