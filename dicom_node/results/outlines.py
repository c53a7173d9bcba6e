"""Secondary Capture images with the segments outlined, for PACS and viewers without SEG.

A picture with burned-in outlines is not a segmentation: it cannot be measured, hidden or
re-coloured, and it adds one image per segmented slice to the study. It is, however, the one
result every PACS displays, so a pipeline can ask for it (``outlines = true``, off by default)
next to its SEG and SR. Each image is a source image, windowed as the source says (or with a
default window for its modality), with each segment's edge drawn in the segment's colour; it
references the image it was made from.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid
from scipy.ndimage import binary_erosion

from dicom_node.compute.frames import Frame
from dicom_node.compute.volume import Volume
from dicom_node.results.equipment import MANUFACTURER, Equipment
from dicom_node.results.seg import Segment

# Colours of segments that have none of their own (the override file may give one): distinct
# from each other and from grey.
PALETTE = [
    (255, 64, 64), (64, 255, 64), (64, 160, 255), (255, 220, 0), (255, 64, 255), (0, 230, 230),
    (255, 140, 0), (160, 100, 255), (180, 255, 100), (255, 150, 180),
]
DEFAULT_WINDOWS = {"CT": (40.0, 400.0), "PT": (5.0, 10.0)}  # center, width


def _first(value) -> float:
    """Window Center and Width may hold several windows; the first is the one to show."""
    return float(value[0]) if isinstance(value, MultiValue) else float(value)


def _window(frame: Frame, plane: np.ndarray) -> tuple[float, float]:
    """The source's own (first) window, else the modality's usual one, else the image's range."""
    header = frame.header
    if "WindowCenter" in header and "WindowWidth" in header:
        return _first(header.WindowCenter), max(_first(header.WindowWidth), 1.0)
    modality = str(header.get("Modality", ""))
    if modality in DEFAULT_WINDOWS:
        return DEFAULT_WINDOWS[modality]
    low, high = float(plane.min()), float(plane.max())
    return (low + high) / 2, max(high - low, 1.0)


def _grey(plane: np.ndarray, center: float, width: float) -> np.ndarray:
    scaled = (plane - (center - width / 2)) / width * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8)


def patient_orientation(orientation: tuple[float, ...]) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of the rows and columns, from Image Orientation (Patient)."""

    def letters(direction: np.ndarray) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))
        order = np.argsort(-np.abs(direction))
        return "".join(names[axis][int(direction[axis] < 0)] for axis in order if abs(direction[axis]) > 0.01)

    return letters(np.array(orientation[:3])), letters(np.array(orientation[3:]))


def _source_reference(frame: Frame) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = frame.header.SOPClassUID
    item.ReferencedSOPInstanceUID = frame.sop_instance_uid
    if frame.index is not None:
        item.ReferencedFrameNumber = frame.index + 1
    item.SpatialLocationsPreserved = "YES"
    return item


def build_outline_images(
    volume: Volume,
    masks: np.ndarray,  # label values per source slice: volume.frame_masks(labels)
    segments: list[Segment],
    equipment: Equipment,
    series_number: int,
    series_description: str,
) -> list[hd.sc.SCImage]:
    """One RGB Secondary Capture image per source image on which the model found something."""
    present = [segment for segment in segments if segment.present]
    series_uid = generate_uid()
    images = []
    for k, (frame, plane) in enumerate(zip(volume.frames, volume.source_images(), strict=True)):
        labels = masks[k]
        if not labels.any():
            continue
        rgb = np.repeat(_grey(plane, *_window(frame, plane))[..., None], 3, axis=-1)
        for position, segment in enumerate(present):
            mask = labels == segment.label_value
            edge = mask & ~binary_erosion(mask)
            rgb[edge] = segment.codes.color or PALETTE[position % len(PALETTE)]
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=frame.header,
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=len(images) + 1,
            manufacturer=MANUFACTURER,
            patient_orientation=patient_orientation(frame.orientation),
            series_description=series_description[:64],
        )
        if "Laterality" not in image:
            # Type 2C, required for paired body parts; a validator cannot tell when it applies
            # (nor can the node), so it is sent empty: unknown, which Type 2 allows.
            image.Laterality = frame.header.get("Laterality", "")
        image.ImageType = ["DERIVED", "SECONDARY"]
        image.DerivationDescription = "segments of the SEG outlined on the source image"
        image.SourceImageSequence = [_source_reference(frame)]
        equipment.describe(image)
        images.append(image)
    return images
