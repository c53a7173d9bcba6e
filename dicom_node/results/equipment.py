"""How the node describes itself, and the model that made a result, in every object it creates."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node import __version__
from dicom_node.bundle_info import BundleInfo

MANUFACTURER = "dicom-node"
MODEL_NAME = "dicom-node"


@dataclass(frozen=True)
class Equipment:
    """Equipment module values; the serial number is the node's AE title, unique per site."""

    ae_title: str

    @property
    def serial_number(self) -> str:
        return self.ae_title

    @property
    def software_versions(self) -> str:
        return __version__

    def describe(self, dataset) -> None:
        """Fill the (Enhanced) General Equipment module of an object the node created."""
        dataset.Manufacturer = MANUFACTURER
        dataset.ManufacturerModelName = MODEL_NAME
        dataset.SoftwareVersions = self.software_versions
        dataset.DeviceSerialNumber = self.serial_number

    @property
    def device_uid(self) -> str:
        """Stable per node: the same AE title always yields the same device UID."""
        return generate_uid(entropy_srcs=["dicom-node device", self.ae_title])

    def observer(self, model_name: str) -> hd.sr.ObserverContext:
        """The node as the device observer of a document it wrote (an SR's findings, a
        rejection note's request); ``model_name`` says what acted: a model, or the node itself."""
        return hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=self.device_uid,
                name=f"{MODEL_NAME} {self.ae_title}"[:64],
                manufacturer_name=MANUFACTURER,
                model_name=model_name[:64],
                serial_number=self.serial_number,
            ),
        )


def algorithm_contribution(info: BundleInfo) -> hd.ContributingEquipment:
    """The model as Contributing Equipment (processing equipment), as IHE AI Results asks of an
    Evidence Creator: the General Equipment module names the node that wrote the object, and a
    viewer or an audit that wants the algorithm behind it reads it here without parsing the
    segment or SR content. The bundle's authors are its manufacturer."""
    return hd.ContributingEquipment(
        manufacturer=(info.authors or "unknown")[:64],
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=info.name[:64],
        software_versions=info.version[:64],
        contribution_datetime=datetime.now(),
        contribution_description=f"automatic segmentation by the MONAI bundle {info.name} {info.version}"[:1024],
    )
