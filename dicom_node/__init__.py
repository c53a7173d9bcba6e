"""dicom-node: a DICOM node that runs MONAI bundles on studies pushed by a PACS."""

__version__ = "0.1.0"
