"""The instance index of several nodes on one database (`dicom_node.ingest.index`)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from dicom_node.ingest.driver_connection import DriverConnection
from dicom_node.ingest.index import InstanceHeader, InstanceIndex, instance_row
from dicom_node.state import db
from tests.support.races import second_writer_while_the_first_is_open

STUDY = "1.2.826.0.1.3680043.8.498.7001"
SERIES = "1.2.826.0.1.3680043.8.498.7001.1"


def _first_instance_of_a_new_study(number: int) -> tuple[InstanceHeader, dict]:
    header = InstanceHeader(
        STUDY, SERIES, f"{SERIES}.{number}", "1.2.840.10008.5.1.4.1.1.2",
        study={"patient_id": "P", "patient_name": "N", "accession_number": "", "study_date": "",
               "study_description": ""},
        series={"modality": "CT", "series_number": 1, "series_description": ""},
    )
    row = instance_row(header, Path(f"/storage/{number}.dcm"), 100, f"{number:064d}", "1.2.840.10008.1.2.1",
                       "MODALITY", received_at=float(number))
    return header, row


def test_two_nodes_indexing_the_first_instances_of_one_study_at_once_both_store(database_url):
    """Each node finds no row for the study and inserts one; the second must wait for the
    first and index its instance, not fail the C-STORE on the study's key."""
    engine = db.connect(database_url)
    connections = [DriverConnection(engine) for _ in range(2)]
    nodes = [InstanceIndex(connection, "reprocess") for connection in connections]

    def second_node() -> None:
        with connections[1].transaction() as cursor:
            nodes[1].record(cursor, *_first_instance_of_a_new_study(2))

    errors = second_writer_while_the_first_is_open(
        connections[0].transaction(),
        lambda cursor: nodes[0].record(cursor, *_first_instance_of_a_new_study(1)),
        second_node,
    )
    assert errors == []
    with db.reading(engine) as connection:
        instances = connection.execute(select(db.instances.c.sop_instance_uid)).scalars().all()
        study = connection.execute(select(db.studies.c.state, db.studies.c.first_received_at,
                                          db.studies.c.last_received_at)).one()
    assert sorted(instances) == [f"{SERIES}.1", f"{SERIES}.2"]
    assert tuple(study) == ("receiving", 1.0, 2.0)
