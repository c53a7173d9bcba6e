"""IOCM rejection note: a Key Object Selection Document titled "Rejected for Quality Reasons"
(DCM 113001) that names the SEG and SR a rerun replaced.

A rerun makes new instances with new UIDs; without a note, the archive shows the old results
beside the new ones, and a radiologist cannot tell which the node stands by. An archive that
implements IHE Imaging Object Change Management (dcm4chee, many vendors' PACS) hides the
instances a rejection note names; one that does not stores the note as one more object in the
study, whose title and description say what was replaced by what.
"""

from __future__ import annotations

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node.results.equipment import MANUFACTURER, MODEL_NAME, Equipment


def build_rejection_note(
    superseded: list[Dataset],
    replacements: list[Dataset],
    equipment: Equipment,
    series_number: int,
    series_description: str,
) -> hd.ko.KeyObjectSelectionDocument:
    """The note rejecting ``superseded`` (their headers, as stored), which ``replacements``
    replace. It joins their study, with its own series, and is written by the node as a device
    observer, as IOCM's Change Requester."""
    observer = equipment.observer(MODEL_NAME)
    replaced_by = ", ".join(f"{ds.Modality} {ds.SOPInstanceUID}" for ds in replacements)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.RejectedForQualityReasons,
        referenced_objects=superseded,
        observer_device_context=observer,
        description=f"Results of an automatic segmentation made again; superseded by {replaced_by}",
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=superseded,
        content=content,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=series_description[:64],
    )
    equipment.describe(note)
    return note
