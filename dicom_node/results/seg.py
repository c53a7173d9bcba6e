"""DICOM Segmentation (binary) from a label map on the source images.

One segment per label the model produced (labels it left empty are left out here and stated as
absent in the SR), each frame referencing the source image it lies on; the SEG joins the source
study in a new series.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.bundle_info import BundleInfo
from dicom_node.compute.frames import GeometryError
from dicom_node.compute.volume import Volume
from dicom_node.results import file_bytes, seg_frames
from dicom_node.results.codes import SegmentCodes, codes_for_label
from dicom_node.results.equipment import MANUFACTURER, MODEL_NAME, Equipment, algorithm_contribution

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """One label of the bundle, found in this series or not."""

    number: int | None  # 1-based Segment Number in the SEG; None when the model found nothing
    label_value: int  # value in the model's label map
    name: str  # the bundle's own label name
    codes: SegmentCodes
    voxel_count: int
    volume_ml: float

    @property
    def present(self) -> bool:
        return self.number is not None


def algorithm_identification(info: BundleInfo) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=info.name[:64], family=codes.DCM.ArtificialIntelligence, version=info.version[:64]
    )


def segments_of(
    scanned: seg_frames.ScannedLabels, info: BundleInfo, overrides: dict[str, SegmentCodes] | None = None
) -> list[Segment]:
    """Every label of the bundle; those the model produced are numbered 1..n in label order."""
    segments, number = [], 0
    for value, name in sorted(info.labels.items()):
        voxels = scanned.counts.get(value, 0)
        number += voxels > 0
        segments.append(Segment(number if voxels else None, value, name, codes_for_label(name, overrides), voxels,
                                scanned.volumes_ml.get(value, 0.0)))
    return segments


def _segment_label_map(per_slice_labels: np.ndarray, segments: list[Segment]) -> np.ndarray:
    """The model's label values renumbered to Segment Numbers (absent labels to 0): one small
    integer array instead of one boolean volume per segment, whatever the number of labels."""
    lookup = np.zeros(int(per_slice_labels.max(initial=0)) + 1, dtype=np.uint16)
    for segment in segments:
        if segment.present and segment.label_value < lookup.size:
            lookup[segment.label_value] = segment.number
    if np.array_equal(lookup, np.arange(lookup.size)):
        return per_slice_labels  # labels 1..n all present: already Segment Numbers
    return lookup[per_slice_labels]


def _stack_of_multi_frame_source(volume: Volume) -> tuple[Dataset, dict[int, int]]:
    """The multi-frame source as highdicom can take it: a copy holding only this stack's frames,
    in the volume's order (highdicom refuses a source whose frames repeat a position, as those of
    an image holding several stacks do), and the frame numbers of the copy mapped back to the
    source's own."""
    headers = volume.source_headers
    if len(headers) != 1:
        raise GeometryError("a stack drawn from several multi-frame instances cannot be one SEG")
    source = with_shared_functional_groups(headers[0])
    stack = copy.copy(source)
    stack.PerFrameFunctionalGroupsSequence = [source.PerFrameFunctionalGroupsSequence[f.index] for f in volume.frames]
    stack.NumberOfFrames = len(volume.frames)
    return stack, {number: frame.index + 1 for number, frame in enumerate(volume.frames, 1)}


def _refer_to_source_frames(seg: hd.seg.Segmentation, source_frame: dict[int, int]) -> None:
    """Frame references of a SEG built on `_stack_of_multi_frame_source`, renumbered to the
    frames of the source itself."""
    for item in seg.PerFrameFunctionalGroupsSequence:
        for derivation in item.get("DerivationImageSequence", []):
            for reference in derivation.get("SourceImageSequence", []):
                if "ReferencedFrameNumber" in reference:
                    reference.ReferencedFrameNumber = source_frame[int(reference.ReferencedFrameNumber)]


def segment_description(segment: Segment, info: BundleInfo) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=segment.number,
        segment_label=segment.codes.label[:64],
        segmented_property_category=segment.codes.category,
        segmented_property_type=segment.codes.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(info),
        tracking_uid=generate_uid(),
        tracking_id=segment.name[:64],
        display_color=hd.color.CIELabColor.from_rgb(*segment.codes.color) if segment.codes.color else None,
    )
    if segment.codes.modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(segment.codes.modifier)
        ]
    return description


def _highdicom_seg(
    sources: list[Dataset],
    pixel_array: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    info: BundleInfo,
    equipment: Equipment,
    series_number: int,
    series_description: str,
) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=sources,
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
        contributing_equipment=[algorithm_contribution(info)],
    )


@dataclass
class EncodedSeg:
    """A SEG ready to store: highdicom's dataset without its frames, and the frames as bytes.

    The frames are the bulk of a SEG and are written by ``seg_frames``; everything else (patient,
    study, series, segments, references, shared functional groups) stays highdicom's.
    """

    dataset: hd.seg.Segmentation  # every attribute but the Per-Frame Functional Groups and Pixel Data
    frames: bytes  # the Per-Frame Functional Groups Sequence element, encoded
    pixels: bytes  # the Pixel Data element, encoded

    def __post_init__(self) -> None:
        if self.dataset.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
            raise ValueError("the SEG's frames are encoded in Explicit VR Little Endian only")
        if max(self.dataset.keys(), default=0) >= seg_frames.PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE:
            raise ValueError("the SEG dataset must end before its frames, which are appended to it")

    @classmethod
    def split(cls, seg: hd.seg.Segmentation) -> EncodedSeg:
        """One highdicom built whole, its frames encoded by pydicom (multi-frame sources)."""
        frames = Dataset()
        frames.PerFrameFunctionalGroupsSequence = seg.PerFrameFunctionalGroupsSequence
        pixels = seg_frames.element(seg_frames.PIXEL_DATA, b"OB", seg.PixelData)  # 1 bit allocated: OB
        del seg.PerFrameFunctionalGroupsSequence, seg.PixelData
        return cls(seg, seg_frames.encoded(frames), pixels)

    def encode(self) -> bytes:
        """The whole file (Part 10, Explicit VR Little Endian)."""
        return file_bytes(self.dataset) + self.frames + self.pixels


def _frames_by_node(
    volume: Volume,
    scanned: seg_frames.ScannedLabels,
    present: list[Segment],
    descriptions: list[hd.seg.SegmentDescription],
    info: BundleInfo,
    equipment: Equipment,
    series_number: int,
    series_description: str,
) -> EncodedSeg:
    """highdicom builds the SEG around one frame of the first source image (its checks on each
    source image were most of its time); ``seg_frames`` writes all the frames, and what depends on
    the other source images is added here as highdicom adds it."""
    number_of = {segment.label_value: segment.number for segment in present}
    masks = {(plane, number_of[value]): bits for (plane, value), bits in scanned.packed.items() if value in number_of}
    sources = volume.source_headers  # one per frame: single-frame images
    orientation = list(volume.frames[0].orientation)
    positions = np.array([frame.position for frame in volume.frames])
    frames = seg_frames.frames_in_order(masks, len(descriptions), positions, orientation)
    one_pixel = np.zeros((1, *scanned.masks.shape[1:]), dtype=np.uint8)
    one_pixel[0, 0, 0] = 1
    seg = _highdicom_seg(sources[:1], one_pixel, descriptions, info, equipment, series_number, series_description)
    seg.SourceImageSequence, seg.ReferencedSeriesSequence = seg_frames.source_references(sources)
    template = seg.PerFrameFunctionalGroupsSequence[0]
    encoded_frames = seg_frames.per_frame_functional_groups(template, sources, frames)
    del seg.PerFrameFunctionalGroupsSequence, seg.PixelData
    seg.NumberOfFrames = len(frames)
    if "SpacingBetweenSlices" not in sources[0]:  # highdicom derives it, here from one position
        [measures] = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
        spacing = seg_frames.spacing_between_slices(positions, orientation)
        if spacing is None:
            measures.pop("SpacingBetweenSlices", None)
        else:
            measures.SpacingBetweenSlices = spacing
    if seg_frames.dimension_organization_is_3d(frames, positions, orientation, len(descriptions)):
        seg.DimensionOrganizationType = "3D"
    pixels = seg_frames.pixel_data(masks, frames, scanned.masks.shape[1] * scanned.masks.shape[2])
    return EncodedSeg(seg, encoded_frames, pixels)


def build_seg(
    volume: Volume,
    scanned: seg_frames.ScannedLabels,  # the label map on the source images, scanned once
    segments: list[Segment],
    info: BundleInfo,
    equipment: Equipment,
    series_number: int,
    series_description: str,
) -> EncodedSeg:
    """The SEG of the segments present (at least one). Single-frame sources, the usual CT and MR
    series, get their frames from ``seg_frames``; a multi-frame source is left to highdicom, given
    the frames of this stack (`_stack_of_multi_frame_source`)."""
    present = [segment for segment in segments if segment.present]
    descriptions = [segment_description(segment, info) for segment in present]
    arguments = (info, equipment, series_number, series_description)
    if all(frame.index is None for frame in volume.frames):
        try:
            return _frames_by_node(volume, scanned, present, descriptions, *arguments)
        except seg_frames.UnexpectedTemplate as reason:
            log.warning("SEG frames left to highdicom: %s", reason)
    source, source_frame = _stack_of_multi_frame_source(volume)
    seg = _highdicom_seg([source], _segment_label_map(scanned.masks, present), descriptions, *arguments)
    _refer_to_source_frames(seg, source_frame)
    return EncodedSeg.split(seg)


# Functional groups that the standard allows shared or per frame, and that highdicom reads from
# the shared group of a multi-frame source only.
_SHAREABLE_GROUPS = ("PixelMeasuresSequence", "PlaneOrientationSequence")


def with_shared_functional_groups(header: Dataset) -> Dataset:
    """``header``, or a copy of it in which a functional group given per frame, the same in
    every frame (Siemens XA writes its pixel measures so), is given once in the shared group:
    PS3.3 C.7.6.16 allows either place, and highdicom reads the shared one."""
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    shared_items = header.get("SharedFunctionalGroupsSequence")
    if not per_frame or not shared_items:
        return header
    movable = [keyword for keyword in _SHAREABLE_GROUPS
               if keyword not in shared_items[0]
               and all(keyword in item for item in per_frame)
               and all(item[keyword].value == per_frame[0][keyword].value for item in per_frame)]
    if not movable:
        return header
    copied = copy.deepcopy(header)
    for keyword in movable:
        setattr(copied.SharedFunctionalGroupsSequence[0], keyword, per_frame[0][keyword].value)
        for item in copied.PerFrameFunctionalGroupsSequence:
            delattr(item, keyword)
    return copied
