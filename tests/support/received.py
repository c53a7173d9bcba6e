"""A node's database and files after receiving images, with no network in between.

Tests of what follows reception (completion, reading ahead, doorbells) need a study stored and
indexed exactly as the receiver does it, but not the association that carries it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import Engine

from dicom_node.config import Config, load_config
from dicom_node.ingest.acceptor import StoreRequest
from dicom_node.ingest.receiver import Receiver
from dicom_node.state import db
from tests.support.ct_study import DEMO_BUNDLE
from tests.support.peers import write_node_config
from tests.support.raw_dul import dataset_bytes


def stored_by_receiver(workdir: Path, images: Iterable[Dataset], stable_after: float) -> tuple[Config, Engine]:
    """A node with the demo bundle for CT that has stored ``images`` through its receiver."""
    config = load_config(write_node_config(
        workdir / "node", 11112, destinations=[], stable_after=stable_after, min_free_disk_mb=0,
        pipelines=[{"name": "ct", "model": str(DEMO_BUNDLE), "select": {"Modality": "CT"}}],
    ))
    engine = db.connect(config.database_url)
    receiver = Receiver(config, engine)
    try:
        for ds in images:
            request = StoreRequest("MODALITY", "127.0.0.1", ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
            assert receiver.store(request, dataset_bytes(ds)) == 0, f"{ds.SOPInstanceUID} was not stored"
    finally:
        receiver.stop()
    return config, engine
