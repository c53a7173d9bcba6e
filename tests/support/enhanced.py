"""Enhanced multi-frame images holding several stacks, as MR and CT scanners write them.

Each stack is a volume at the same positions; frames are interleaved position by position (all
stacks' frames at the first position, then the next), and what sets a stack apart is given
only per frame: its Frame Type, echo time, temporal position, or an index along a declared
dimension, as the file's Dimension Index Sequence says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import EnhancedCTImageStorage, EnhancedMRImageStorage, generate_uid

from tests.support.ct_study import (
    StudyInfo,
    _base,
    _image_pixel_module,
    _stored_values,
    shared_functional_groups,
)

# A private dimension, as some vendors index the kind of each frame.
PRIVATE_DIMENSION = 0x20051011
PRIVATE_GROUP = 0x2005140F
FRAME_TYPE_SEQUENCE = {"MR": "MRImageFrameTypeSequence", "CT": "CTImageFrameTypeSequence"}
# Where each dimension's value lives: (attribute, functional group sequence)
DIMENSIONS = {
    "stack": (Tag("StackID"), Tag("FrameContentSequence")),
    "in-stack position": (Tag("InStackPositionNumber"), Tag("FrameContentSequence")),
    "temporal position": (Tag("TemporalPositionIndex"), Tag("FrameContentSequence")),
    "echo time": (Tag("EffectiveEchoTime"), Tag("MREchoSequence")),
    "private": (Tag(PRIVATE_DIMENSION), Tag(PRIVATE_GROUP)),
}


@dataclass(frozen=True)
class StackKind:
    """What one stack's frames say of themselves."""

    frame_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "MAGNITUDE", "NONE")
    echo_time: float | None = None  # ms, in MREchoSequence
    temporal_position: int | None = None
    private_index: int = 1  # its index along the private dimension, when declared


def enhanced_stacks(
    volumes: list[np.ndarray],
    kinds: list[StackKind],
    affine_lps: np.ndarray,
    study: StudyInfo,
    modality: str,
    dimensions: list[str],
) -> Dataset:
    """One Enhanced MR or CT instance holding ``volumes[s]`` as stack s, frame by frame."""
    sop_class = EnhancedMRImageStorage if modality == "MR" else EnhancedCTImageStorage
    ds = _base(study, sop_class)
    ds.Modality = modality
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 5
    ds.SeriesDescription = f"Enhanced {modality} with {len(volumes)} stacks"
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "MIXED"]
    ds.ContentDate, ds.ContentTime = study.study_date, study.study_time
    ds.AcquisitionDateTime = study.study_date + study.study_time
    shape = volumes[0].shape
    _image_pixel_module(ds, shape[1], shape[0])
    positions = shape[2]
    ds.NumberOfFrames = positions * len(volumes)

    organization = generate_uid()
    ds.DimensionOrganizationSequence = Sequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = organization
    index_items = []
    for name in dimensions:
        pointer, group = DIMENSIONS[name]
        item = Dataset()
        item.DimensionOrganizationUID = organization
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = group
        index_items.append(item)
    ds.DimensionIndexSequence = Sequence(index_items)

    ds.SharedFunctionalGroupsSequence = shared_functional_groups(affine_lps, "US")

    per_frame, pixels = [], []
    echo_times = sorted({kind.echo_time for kind in kinds if kind.echo_time is not None})
    for k, s in [(k, s) for k in range(positions) for s in range(len(volumes))]:
        volume, kind = volumes[s], kinds[s]
        position_value = [f"{v:.6f}" for v in (affine_lps @ np.array([0.0, 0.0, k, 1.0]))[:3]]
        item, content, position, frame_type = Dataset(), Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = position_value
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        if kind.temporal_position is not None:
            content.TemporalPositionIndex = kind.temporal_position
        index = {"stack": 1, "in-stack position": k + 1, "temporal position": kind.temporal_position or 1,
                 "echo time": echo_times.index(kind.echo_time) + 1 if kind.echo_time is not None else 1,
                 "private": kind.private_index}
        content.DimensionIndexValues = [index[name] for name in dimensions]
        frame_type.FrameType = list(kind.frame_type)
        if modality == "MR":
            frame_type.ComplexImageComponent = kind.frame_type[2] if kind.frame_type[2] in (
                "MAGNITUDE", "PHASE", "REAL", "IMAGINARY") else "MAGNITUDE"
        item.FrameContentSequence = Sequence([content])
        item.PlanePositionSequence = Sequence([position])
        setattr(item, FRAME_TYPE_SEQUENCE[modality], Sequence([frame_type]))
        if kind.echo_time is not None:
            echo = Dataset()
            echo.EffectiveEchoTime = kind.echo_time
            item.MREchoSequence = Sequence([echo])
        per_frame.append(item)
        pixels.append(_stored_values(volume[:, :, k]).T)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.ascontiguousarray(np.stack(pixels)).tobytes()
    return ds
