"""How the node describes itself in every object it creates."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import generate_uid

from dicom_node import __version__

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
