"""DICOM Segmentation (binary) from a label map on the source images.

One segment per non-empty label, each frame referencing the source image it lies on; the SEG
joins the source study in a new series.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ..inference import BundleInfo
from ..volume import Volume
from .codes import SegmentCodes, codes_for_label
from .equipment import MANUFACTURER, MODEL_NAME, Equipment


@dataclass(frozen=True)
class Segment:
    number: int  # 1-based, in the SEG
    label_value: int  # value in the model's label map
    name: str
    codes: SegmentCodes
    voxel_count: int


def algorithm_identification(info: BundleInfo) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=info.name[:64], family=codes.DCM.ArtificialIntelligence, version=info.version[:64]
    )


def present_segments(labels: np.ndarray, info: BundleInfo) -> list[Segment]:
    """The labels the model actually produced, numbered 1..n in label order."""
    counts = np.bincount(labels.ravel(), minlength=max(info.labels, default=0) + 1)
    segments = []
    for value, name in sorted(info.labels.items()):
        if counts[value] > 0:
            segments.append(Segment(len(segments) + 1, value, name, codes_for_label(name), int(counts[value])))
    return segments


def build_seg(
    volume: Volume,
    labels: np.ndarray,
    segments: list[Segment],
    info: BundleInfo,
    equipment: Equipment,
    series_number: int,
    series_description: str,
) -> hd.seg.Segmentation:
    frames = volume.frame_masks(labels)
    pixel_array = np.stack([frames == segment.label_value for segment in segments], axis=-1)
    algorithm = algorithm_identification(info)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=segment.number,
            segment_label=segment.name[:64],
            segmented_property_category=segment.codes.category,
            segmented_property_type=segment.codes.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(),
            tracking_id=segment.name[:64],
        )
        for segment in segments
    ]
    return hd.seg.Segmentation(
        source_images=volume.sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.serial_number,
        series_description=series_description[:64],
        content_label="SEGMENTATION",
        content_description=f"{info.name} {info.version}"[:64],
    )
