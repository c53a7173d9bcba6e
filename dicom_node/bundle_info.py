"""What the node knows of a bundle without loading it: name, version, labels.

Read from the bundle's ``configs/metadata.json`` only, so that the receiver, completion and the
results' encoders can know it without importing PyTorch or MONAI (`dicom_node.compute` loads
those, in the worker processes only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BundleInfo:
    name: str
    version: str
    labels: dict[int, str]  # output label value -> name, background excluded
    description: str
    authors: str = ""  # who made the model: the algorithm's manufacturer in the results


def read_bundle_info(bundle_dir: Path) -> BundleInfo:
    """Name, version and label names from ``configs/metadata.json``."""
    metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    output = outputs.get("pred") or next(iter(outputs.values()), {})
    channel_def = output.get("channel_def") or output.get("label_def") or {}  # the Zoo writes either
    labels = {
        int(value): str(name)
        for value, name in channel_def.items()
        if int(value) != 0 and str(name).lower() != "background"
    }
    return BundleInfo(
        name=str(metadata.get("name", bundle_dir.name)),
        version=str(metadata.get("version", "0")),
        labels=labels,
        description=str(metadata.get("description", "")),
        authors=str(metadata.get("authors", "")),
    )
