"""TID 1500 measurement report: one volume (mL) per segment, referencing the SEG.

Radiology information systems and worklists read numbers from SR, not from SEG pixels; the
report carries the same segments with their codes, their volumes and the algorithm that made
them.
"""

from __future__ import annotations

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from dicom_node.bundle_info import BundleInfo
from dicom_node.compute.volume import Volume
from dicom_node.results.equipment import MANUFACTURER, Equipment, algorithm_contribution
from dicom_node.results.seg import Segment

MILLILITER = Code("mL", "UCUM", "milliliter")
ENGLISH = Code("en-US", "RFC5646", "English (United States)")
PRESENCE = Code("705057003", "SCT", "Presence")
PROCEDURES = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
}


def _present_group(segment: Segment, seg: hd.seg.Segmentation, volume: Volume, algorithm) -> object:
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=seg.SegmentSequence[segment.number - 1].TrackingUID, identifier=segment.name[:64]
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=segment.number,
            source_series=hd.sr.SourceSeriesForSegmentation(str(volume.frames[0].header.SeriesInstanceUID)),
        ),
        finding_type=segment.codes.property_type,
        finding_category=segment.codes.category,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.SCT.Volume,
                value=round(segment.volume_ml, 3),
                unit=MILLILITER,
                algorithm_id=algorithm,
            )
        ],
    )


def _absent_group(segment: Segment, algorithm) -> object:
    """A label the model looked for and did not find: said so, rather than silently missing."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=segment.name[:64]),
        finding_type=segment.codes.property_type,
        finding_category=segment.codes.category,
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=PRESENCE, value=codes.SCT.Absent)],
    )


def build_sr(
    volume: Volume,
    seg: hd.seg.Segmentation | None,
    segments: list[Segment],
    info: BundleInfo,
    equipment: Equipment,
    series_number: int,
    series_description: str,
    previous_versions: list[Dataset] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The report of every label: a volume for each present one, "absent" for the others.

    ``seg`` is None when the model found none of its labels. ``previous_versions`` are the
    reports this one replaces (the same series and pipeline run before): they are listed as its
    Predecessor Documents, so that a reader of the new report can tell it is a revision.
    """
    observer = equipment.observer(f"{info.name} {info.version}")
    algorithm = hd.sr.AlgorithmIdentification(
        name=info.name[:64], version=info.version[:64], family=codes.DCM.ArtificialIntelligence
    )
    groups = [
        _present_group(segment, seg, volume, algorithm) if segment.present else _absent_group(segment, algorithm)
        for segment in segments
    ]
    modality = str(volume.frames[0].header.get("Modality", ""))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURES.get(modality, codes.LN.CTUnspecifiedBodyRegion),
        imaging_measurements=groups,
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(language=ENGLISH),
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*([seg] if seg is not None else []), *volume.source_headers],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=series_description[:64],
        previous_versions=previous_versions or None,
        contributing_equipment=[algorithm_contribution(info)],
    )
    equipment.describe(sr)  # highdicom fills only the manufacturer of the equipment module
    return sr
