"""The DICOM listener: association policy, C-ECHO and C-STORE.

An instance is answered Success only once its file is on disk (atomically, durably) and its
row is committed: a Success the PACS sees is a promise that the instance will be processed,
even if the node is killed the next moment. Bytes are stored exactly as received, in the
transfer syntax the peer chose, so nothing is lost to a re-encoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, UID_dictionary
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine, select

from . import db, store
from .config import Config

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# Failure statuses of the Storage Service Class (PS3.4 B.2.3).
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


# Every transfer syntax pynetdicom knows. Where a peer offers several in one context, the first
# of this list wins: explicit VR keeps the value representations the sender wrote.
ACCEPTED_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian] + [
    syntax for syntax in ALL_TRANSFER_SYNTAXES if syntax != ExplicitVRLittleEndian
]


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pydicom or pynetdicom knows, so no modality is turned away."""
    from_pydicom = {
        uid
        for uid, (name, kind, *_rest) in UID_dictionary.items()
        if kind == "SOP Class" and "Storage" in name and "Commitment" not in name
    }
    from_pynetdicom = {str(context.abstract_syntax) for context in AllStoragePresentationContexts}
    return sorted(from_pydicom | from_pynetdicom)


@dataclass(frozen=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_instance_uid: str


class Receiver:
    """Handles one node's incoming associations; one instance per `serve` process."""

    def __init__(self, config: Config, engine: Engine) -> None:
        self.config = config
        self.engine = engine

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_store(self, event: evt.Event) -> int | tuple[int, Dataset]:
        peer = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        try:
            dataset = event.dataset
            identifiers = _identifiers(dataset)
        except Exception as error:  # noqa: BLE001 - any parse failure is the peer's malformed data
            log.warning("refused an instance from %s: cannot parse the dataset (%s)", peer, error)
            return CANNOT_UNDERSTAND
        if identifiers is None:
            log.warning("refused an instance from %s: SOP Class/Instance, Study or Series UID missing or invalid", peer)
            return CANNOT_UNDERSTAND
        if str(dataset.SOPClassUID) != str(event.request.AffectedSOPClassUID):
            log.warning(
                "refused %s from %s: dataset SOP class %s is not the negotiated %s",
                identifiers.sop_instance_uid,
                peer,
                dataset.SOPClassUID,
                event.request.AffectedSOPClassUID,
            )
            return DATASET_DOES_NOT_MATCH_SOP_CLASS
        try:
            self._store(event, dataset, identifiers)
        except OSError as error:
            log.error("could not store %s from %s: %s", identifiers.sop_instance_uid, peer, error)
            return OUT_OF_RESOURCES
        except Exception:
            log.exception("could not store %s from %s", identifiers.sop_instance_uid, peer)
            return PROCESSING_FAILURE
        return SUCCESS

    def _store(self, event: evt.Event, dataset: Dataset, ids: StoredInstance) -> None:
        path = store.instance_path(
            self.config.node.data_dir, ids.study_uid, ids.series_uid, ids.sop_instance_uid
        )
        content = event.encoded_dataset(include_meta=True)
        store.write_durably(path, content)
        received_at = db.now()
        with self.engine.begin() as connection:
            already_stored = connection.execute(
                select(db.instances.c.sop_instance_uid).where(
                    db.instances.c.sop_instance_uid == ids.sop_instance_uid
                )
            ).first()
            if already_stored:
                return  # the same instance again: its file was rewritten in place, nothing else changes
            connection.execute(
                db.upsert(self.engine, db.studies)
                .values(
                    study_uid=ids.study_uid,
                    patient_id=str(dataset.get("PatientID", "")),
                    patient_name=str(dataset.get("PatientName", "")),
                    accession_number=str(dataset.get("AccessionNumber", "")),
                    study_date=str(dataset.get("StudyDate", "")),
                    study_description=str(dataset.get("StudyDescription", "")),
                    state="receiving",
                    first_received_at=received_at,
                    last_received_at=received_at,
                )
                .on_conflict_do_update(
                    index_elements=["study_uid"],
                    set_={"state": "receiving", "last_received_at": received_at},
                )
            )
            connection.execute(
                db.upsert(self.engine, db.series)
                .values(
                    series_uid=ids.series_uid,
                    study_uid=ids.study_uid,
                    modality=str(dataset.get("Modality", "")),
                    series_number=_int_or_none(dataset.get("SeriesNumber")),
                    series_description=str(dataset.get("SeriesDescription", "")),
                )
                .on_conflict_do_nothing()
            )
            connection.execute(
                db.instances.insert().values(
                    sop_instance_uid=ids.sop_instance_uid,
                    series_uid=ids.series_uid,
                    study_uid=ids.study_uid,
                    sop_class_uid=str(dataset.SOPClassUID),
                    transfer_syntax_uid=str(event.context.transfer_syntax),
                    path=str(path),
                    size=len(content),
                    calling_ae=event.assoc.requestor.ae_title,
                    received_at=received_at,
                )
            )

    def start(self) -> ThreadedAssociationServer:
        """Listen in background threads; the caller owns the returned server's shutdown."""
        ae = AE(ae_title=self.config.node.ae_title)
        ae.require_called_aet = True
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
        ae.network_timeout = 60
        ae.dimse_timeout = 120
        ae.acse_timeout = 30
        ae.add_supported_context(Verification, ACCEPTED_TRANSFER_SYNTAXES)
        for sop_class in storage_sop_classes():
            ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_ECHO, self.handle_echo), (evt.EVT_C_STORE, self.handle_store)]
        node = self.config.node
        log.info("listening as %s on %s:%d", node.ae_title, node.host, node.port)
        return ae.start_server((node.host, node.port), block=False, evt_handlers=handlers)


def _identifiers(dataset: Dataset) -> StoredInstance | None:
    values = [dataset.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    if not all(values) or not dataset.get("SOPClassUID"):
        return None
    study_uid, series_uid, sop_instance_uid = (str(v) for v in values)
    if not all(store.is_valid_uid(uid) for uid in (study_uid, series_uid, sop_instance_uid)):
        return None
    return StoredInstance(study_uid, series_uid, sop_instance_uid)


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
