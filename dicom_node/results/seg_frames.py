"""The frames of a binary SEG on single-frame source images, encoded straight to bytes.

highdicom builds one pydicom item per frame, four nested sequences each, and pydicom then encodes
them element by element: for a 300-slice CT with two segments, 600 items took about 0.9 s to
build and 0.8 s to write, more than the rest of the job outside the network; highdicom's checks
on each source image took another 0.2 to 0.3 s. The items all have one shape; only the source
image, the position, the dimension index values and the segment number change from frame to
frame. This module writes them, and the bit-packed frames, directly in Explicit VR Little Endian,
in highdicom's order (segment by segment, planes sorted along the normal, empty frames left out).
Every constant part (derivation code, purpose of reference, spatial locations preserved) is copied
from an item highdicom built itself around one frame of the first source image; what depends on
the other source images (references, spacing, dimension organisation) is derived here as
highdicom derives it. ``tests/results/test_seg_frames.py`` checks that the whole SEG equals the one
highdicom builds alone, element for element, on every geometry of the volume tests.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector, get_volume_positions
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.valuerep import DS, format_number_as_ds

DERIVATION_IMAGE_SEQUENCE = 0x00089124
SOURCE_IMAGE_SEQUENCE = 0x00082112
REFERENCED_SOP_CLASS_UID = 0x00081150
REFERENCED_SOP_INSTANCE_UID = 0x00081155
FRAME_CONTENT_SEQUENCE = 0x00209111
DIMENSION_INDEX_VALUES = 0x00209157
PLANE_POSITION_SEQUENCE = 0x00209113
IMAGE_POSITION_PATIENT = 0x00200032
SEGMENT_IDENTIFICATION_SEQUENCE = 0x0062000A
REFERENCED_SEGMENT_NUMBER = 0x0062000B
PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE = 0x52009230
PIXEL_DATA = 0x7FE00010
ITEM = 0xFFFEE000

# What highdicom puts in a frame's item, and whether it names the frame's segment there: with a
# single segment, that is named once for all frames, in the Shared Functional Groups.
FRAME_ITEM_LAYOUTS = {
    (DERIVATION_IMAGE_SEQUENCE, FRAME_CONTENT_SEQUENCE, PLANE_POSITION_SEQUENCE, SEGMENT_IDENTIFICATION_SEQUENCE): True,
    (DERIVATION_IMAGE_SEQUENCE, FRAME_CONTENT_SEQUENCE, PLANE_POSITION_SEQUENCE): False,
}
# VRs whose explicit-VR header has a 4-byte length (PS3.5 7.1.2)
LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


class UnexpectedTemplate(ValueError):
    """highdicom's frame item no longer has the shape this module writes; build the SEG its way."""


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element of defined length, padded to even length."""
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    group, number = tag >> 16, tag & 0xFFFF
    if vr in LONG_LENGTH_VRS:
        return struct.pack("<HH2sHI", group, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


def sequence(tag: int, items: Iterable[bytes]) -> bytes:
    """A sequence of defined length whose items are given already encoded."""
    body = b"".join(struct.pack("<HHI", ITEM >> 16, ITEM & 0xFFFF, len(item)) + item for item in items)
    return element(tag, b"SQ", body)


def encoded(dataset: Dataset) -> bytes:
    """``dataset``'s elements as pydicom encodes them: used once per SEG for the constant parts."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def position_value(position: Sequence[float]) -> bytes:
    """Image Position (Patient) as highdicom writes it (pydicom's automatic DS formatting)."""
    return "\\".join(str(DS(value, auto_format=True)) for value in position).encode("ascii")


@dataclass(frozen=True)
class SegFrame:
    plane: int  # index of the source image (and of the label map's first axis)
    segment: int  # Segment Number
    dimension_index: tuple[int, int]  # (segment number, rank of the plane among the planes kept)


# Up to this many labels, testing each one on an image is cheaper than counting the image's values.
LABELS_TESTED_ONE_BY_ONE = 4


@dataclass
class ScannedLabels:
    """A label map on the source images, read once for both results: the voxel count of each
    label (which labels become segments), the volume in mL it covers (the SR's measurement), and
    the bit-packed mask (first
    pixel in the lowest bit) of every (image, label) pair that has a voxel (the SEG's frames;
    pairs not listed are the empty frames it leaves out)."""

    masks: np.ndarray  # masks[k]: label values on source image k (Volume.frame_masks)
    packed: dict[tuple[int, int], np.ndarray]  # (k, label value) -> packed bits
    counts: dict[int, int]  # label value -> voxels
    volumes_ml: dict[int, float]  # label value -> mL


def scan_labels(masks: np.ndarray, label_values: Sequence[int], voxel_ml: Sequence[float]) -> ScannedLabels:
    """Compares each image with each label it may hold, once; with many labels, a count of the
    image's values first says which ones. Values outside ``label_values`` are ignored.
    ``voxel_ml[k]``: what one voxel of image k stands for (`Volume.frame_voxel_ml`)."""
    wanted = sorted(set(label_values))
    packed, counts, volumes = {}, dict.fromkeys(wanted, 0), dict.fromkeys(wanted, 0.0)
    for plane, image in enumerate(masks):
        if len(wanted) <= LABELS_TESTED_ONE_BY_ONE:
            candidates = wanted
        else:
            found = np.bincount(image.ravel(), minlength=wanted[-1] + 1)
            candidates = [value for value in wanted if found[value]]
        for value in candidates:
            bits = image == value
            voxels = int(np.count_nonzero(bits))
            if voxels:
                packed[plane, value] = np.packbits(bits, axis=None, bitorder="little")
                counts[value] += voxels
                volumes[value] += voxels * float(voxel_ml[plane])
    return ScannedLabels(masks, packed, counts, volumes)


def frames_in_order(
    masks: dict[tuple[int, int], np.ndarray], segment_count: int, positions: np.ndarray, orientation: Sequence[float]
) -> list[SegFrame]:
    """The SEG's frames as highdicom orders them: by segment, then by the plane's distance along
    the normal of highdicom's volume convention, leaving out planes where the segment is absent;
    the second dimension index counts only planes where some segment is present."""
    normal = get_normal_vector(orientation, index_convention=VOLUME_INDEX_CONVENTION)
    distances = positions @ normal
    holding = {plane for plane, _ in masks}
    kept = [int(plane) for plane in np.argsort(distances, kind="stable") if plane in holding]
    rank = {plane: number for number, plane in enumerate(kept, 1)}
    return [
        SegFrame(plane, segment, (segment, rank[plane]))
        for segment in range(1, segment_count + 1)
        for plane in kept
        if (plane, segment) in masks
    ]


def dimension_organization_is_3d(
    frames: list[SegFrame], positions: np.ndarray, orientation: Sequence[float], segment_count: int
) -> bool:
    """highdicom's rule for Dimension Organization Type 3D: one segment, several planes, and the
    planes kept (in source order) regularly spaced along the normal."""
    kept = sorted({frame.plane for frame in frames})
    if len(kept) < 2 or segment_count != 1:
        return False
    spacing, _ = get_volume_positions(image_positions=positions[kept], image_orientation=orientation, sort=False)
    return spacing is not None and spacing > 0.0


def source_references(sources: list[Dataset]) -> tuple[list[Dataset], list[Dataset]]:
    """Source Image Sequence and Referenced Series Sequence as highdicom writes them: every source
    image, in the order given, and the same items grouped by series."""
    images, by_series = [], defaultdict(list)
    for source in sources:
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        images.append(reference)
        by_series[source.SeriesInstanceUID].append(reference)
    series = []
    for series_uid, references in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedInstanceSequence = references
        series.append(item)
    return images, series


def spacing_between_slices(positions: np.ndarray, orientation: Sequence[float]) -> str | None:
    """highdicom's Spacing Between Slices when the source images give none: from all the source
    positions, before any frame is left out, so that a reader can rebuild the volume."""
    spacing, _ = get_volume_positions(image_positions=positions, image_orientation=orientation)
    return None if spacing is None else format_number_as_ds(spacing)


def per_frame_functional_groups(template: Dataset, sources: list[Dataset], frames: list[SegFrame]) -> bytes:
    """The Per-Frame Functional Groups Sequence, from one item highdicom built (``template``)."""
    layout = tuple(int(item.tag) for item in template)  # a Dataset iterates in tag order
    segment_per_frame = FRAME_ITEM_LAYOUTS.get(layout)
    if segment_per_frame is None or len(template.FrameContentSequence[0].DimensionIndexValues) != 2:
        raise UnexpectedTemplate(f"frame item holds {[f'{tag:08X}' for tag in layout]}")
    [derivation] = template.DerivationImageSequence
    [source] = derivation.SourceImageSequence
    if "ReferencedFrameNumber" in source:
        raise UnexpectedTemplate("frames reference source frames")
    source_constants = Dataset()
    for constant in source:
        if constant.tag not in (REFERENCED_SOP_CLASS_UID, REFERENCED_SOP_INSTANCE_UID):
            source_constants.add(constant)
    derivation_constants = Dataset()
    for constant in derivation:
        if constant.tag != SOURCE_IMAGE_SEQUENCE:
            derivation_constants.add(constant)
    source_tail, derivation_tail = encoded(source_constants), encoded(derivation_constants)
    derivations, positions = {}, {}
    for plane in {frame.plane for frame in frames}:
        header = sources[plane]
        source_item = (
            element(REFERENCED_SOP_CLASS_UID, b"UI", str(header.SOPClassUID).encode("ascii"))
            + element(REFERENCED_SOP_INSTANCE_UID, b"UI", str(header.SOPInstanceUID).encode("ascii"))
            + source_tail
        )
        derivations[plane] = sequence(
            DERIVATION_IMAGE_SEQUENCE, [sequence(SOURCE_IMAGE_SEQUENCE, [source_item]) + derivation_tail]
        )
        positions[plane] = sequence(
            PLANE_POSITION_SEQUENCE,
            [element(IMAGE_POSITION_PATIENT, b"DS", position_value(header.ImagePositionPatient))],
        )
    segment_items = {
        segment: sequence(
            SEGMENT_IDENTIFICATION_SEQUENCE, [element(REFERENCED_SEGMENT_NUMBER, b"US", struct.pack("<H", segment))]
        ) if segment_per_frame else b""
        for segment in {frame.segment for frame in frames}
    }
    return sequence(PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, (
        derivations[frame.plane]
        + sequence(FRAME_CONTENT_SEQUENCE, [element(DIMENSION_INDEX_VALUES, b"UL", struct.pack("<2I", *frame.dimension_index))])
        + positions[frame.plane]
        + segment_items[frame.segment]
        for frame in frames
    ))


def pixel_data(masks: dict[tuple[int, int], np.ndarray], frames: list[SegFrame], pixels_per_frame: int) -> bytes:
    """Pixel Data of a BINARY SEG: one bit per pixel, frames one after the other with no padding
    between them (PS3.5 8.1.1), the whole padded to even length."""
    packed = [masks[frame.plane, frame.segment] for frame in frames]
    if pixels_per_frame % 8:  # frames do not start on a byte: pack them again as one run of bits
        bits = [np.unpackbits(mask, count=pixels_per_frame, bitorder="little") for mask in packed]
        packed = [np.packbits(np.concatenate(bits), bitorder="little")]
    return element(PIXEL_DATA, b"OB", b"".join(mask.tobytes() for mask in packed))
