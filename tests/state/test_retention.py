"""Retention on the database and the files: which studies count as finished and when, what the
policy removes at its time and under the high-water mark, and what a purge spares (a late
instance's file and row, a study no longer finished)."""

from __future__ import annotations

import os
import time

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from dicom_node.config import DAY_SECONDS, Config
from dicom_node.state import db, files, retention

NOW = time.time()
DAY = DAY_SECONDS


def config_for(tmp_path, **policy) -> Config:
    node = {"data_dir": str(tmp_path / "data"), "min_free_disk_mb": policy.pop("min_free_disk_mb", 0)}
    return Config.model_validate({"node": node, "retention": policy})


@pytest.fixture
def engine(tmp_path, database_url):
    return db.connect(database_url)


def add_study(engine, data_dir, uid: str, finished_days_ago: float, instances: int = 2, size: int = 1000,
              job: str | None = None, delivery: str | None = None, state: str = "complete") -> list:
    """A study whose last event was ``finished_days_ago`` before NOW, with instance files of
    ``size`` bytes, and optionally a job in state ``job`` with a SEG delivered in ``delivery``."""
    at = NOW - finished_days_ago * DAY
    paths = []
    with engine.begin() as connection:
        connection.execute(db.studies.insert().values(study_uid=uid, state=state, first_received_at=at - 60,
                                                      last_received_at=at - 30, completed_at=at - 20))
        connection.execute(db.series.insert().values(series_uid=uid + ".1", study_uid=uid))
        for number in range(instances):
            path = files.instance_path(data_dir, uid, uid + ".1", f"{uid}.1.{number + 1}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0" * size)
            os.utime(path, (at - 30, at - 30))
            paths.append(path)
            connection.execute(db.instances.insert().values(
                sop_instance_uid=f"{uid}.1.{number + 1}", series_uid=uid + ".1", study_uid=uid, sop_class_uid="1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1", path=str(path), size=size, sha256="0" * 64,
                received_at=at - 30))
        if job is not None:
            job_id = connection.execute(db.jobs.insert().values(
                study_uid=uid, series_uid=uid + ".1", pipeline="p", state=job, created_at=at - 20,
                finished_at=at - 10 if job in ("done", "failed") else None)).inserted_primary_key[0]
            result_path = files.result_path(data_dir, uid, uid + ".9", uid + ".9.1")
            result_path.parent.mkdir(parents=True, exist_ok=True)
            result_path.write_bytes(b"\0" * size)
            paths.append(result_path)
            result_id = connection.execute(db.results.insert().values(
                job_id=job_id, kind="SEG", sop_instance_uid=uid + ".9.1", series_uid=uid + ".9", path=str(result_path),
                created_at=at - 10)).inserted_primary_key[0]
            if delivery is not None:
                connection.execute(db.deliveries.insert().values(
                    result_id=result_id, destination="pacs", state=delivery, not_before=0,
                    sent_at=at if delivery == "sent" else None))
    return paths


def planned(config, engine, free_mb: float = 1e9) -> list[tuple[str, str]]:
    with db.reading(engine) as connection:
        return [(purge.study_uid, purge.part) for purge in retention.plan(config, connection, NOW, free_mb)]


def test_a_study_is_finished_when_its_last_delivery_went_and_nothing_is_left_to_do(tmp_path, engine):
    data = tmp_path / "data"
    add_study(engine, data, "1.1", 3, job="done", delivery="sent")
    add_study(engine, data, "1.2", 30, job="done", delivery="pending")
    add_study(engine, data, "1.3", 30, job="done", delivery="dead")
    add_study(engine, data, "1.4", 30, job="queued")
    add_study(engine, data, "1.5", 30, job="running")
    add_study(engine, data, "1.6", 30, state="receiving")
    add_study(engine, data, "1.7", 30, job="failed")
    add_study(engine, data, "1.8", 30)  # no pipeline took it
    with db.reading(engine) as connection:
        finished = {study.study_uid: study for study in retention.finished_studies(connection)}
    assert sorted(finished) == ["1.1", "1.7", "1.8"]
    assert finished["1.1"].finished_at == NOW - 3 * DAY, "its delivery is the last thing that happened to it"
    assert finished["1.1"].instance_bytes == 2000


def test_each_part_goes_at_its_own_time(tmp_path, engine):
    data = tmp_path / "data"
    config = config_for(tmp_path, instances_days=7, results_days=30, records_days=365, purge_below_free_mb=0)
    add_study(engine, data, "1.1", 3, job="done", delivery="sent")
    add_study(engine, data, "1.2", 10, job="done", delivery="sent")
    add_study(engine, data, "1.3", 40, job="done", delivery="sent")
    add_study(engine, data, "1.4", 400, job="done", delivery="sent")
    add_study(engine, data, "1.5", 400, job="done", delivery="pending")
    assert planned(config, engine) == [("1.4", "records"), ("1.3", "instances"), ("1.3", "results"),
                                       ("1.2", "instances")]
    forever = config_for(tmp_path, instances_days="forever", results_days="forever", records_days="forever",
                         purge_below_free_mb=0)
    assert planned(forever, engine) == []


def test_below_the_high_water_mark_the_longest_finished_go_first_and_no_more_than_needed(tmp_path, engine):
    data = tmp_path / "data"
    config = config_for(tmp_path, instances_days="forever", results_days="forever", records_days="forever",
                        purge_below_free_mb=100)
    add_study(engine, data, "1.1", 1, size=10_000_000, job="done", delivery="sent")
    add_study(engine, data, "1.2", 2, size=10_000_000, job="done", delivery="sent")
    add_study(engine, data, "1.3", 3, size=10_000_000, job="done", delivery="pending")
    assert planned(config, engine, free_mb=150) == []
    # 15 MB short: the oldest finished study's instances (20 MB) are enough.
    assert planned(config, engine, free_mb=85) == [("1.2", "instances")]
    # 25 MB short: its results (10 MB) too; never the study with a delivery pending.
    assert planned(config, engine, free_mb=75) == [("1.2", "instances"), ("1.2", "results")]
    assert planned(config, engine, free_mb=0) == [("1.2", "instances"), ("1.2", "results"), ("1.1", "instances"),
                                                  ("1.1", "results")]


def test_a_purge_removes_files_and_rows_in_turn_and_records_each_step(tmp_path, engine):
    data = tmp_path / "data"
    config = config_for(tmp_path, instances_days=0, results_days=0, records_days="forever", purge_below_free_mb=0)
    paths = add_study(engine, data, "1.1", 1, job="done", delivery="sent")
    done = retention.run(config, engine)
    assert [(outcome.purge.part, outcome.files) for outcome in done] == [("instances", 2), ("results", 1)]
    assert not any(path.exists() for path in paths)
    assert not (data / "studies" / "1.1").exists() and not (data / "results" / "1.1").exists()
    with db.reading(engine) as connection:
        study = connection.execute(select(db.studies).where(db.studies.c.study_uid == "1.1")).mappings().one()
        assert study["instances_purged_at"] and study["results_purged_at"]
        assert connection.execute(select(db.instances)).all() == []
        messages = connection.execute(select(db.events.c.message).where(db.events.c.study_uid == "1.1")).scalars()
        assert [m.split(":")[0] for m in messages] == ["2 received instances purged (0.0 MB)",
                                                       "1 result files purged (0.0 MB)"]
    assert retention.run(config, engine) == [], "nothing is purged twice"
    assert files.purge_stamp(data) != 0, "the receivers are told"

    records = config_for(tmp_path, instances_days=0, results_days=0, records_days=0, purge_below_free_mb=0)
    [outcome] = retention.run(records, engine)
    assert outcome.purge.part == "records"
    with db.reading(engine) as connection:
        for table in (db.studies, db.series, db.jobs, db.results, db.deliveries):
            assert connection.execute(select(table)).all() == [], table.name
        [message] = connection.execute(select(db.events.c.message).where(db.events.c.study_uid.is_(None))).scalars()
        assert message.startswith("records of study 1.1 purged")


@pytest.mark.parametrize("row_recorded", [True, False], ids=["its row recorded", "its row not yet recorded"])
def test_a_late_instance_written_during_a_purge_keeps_its_file(tmp_path, engine, row_recorded):
    """A PACS sends an image of the study again while it is purged: same path. Its file is
    spared; so is its row once recorded, and a row not yet recorded is written after the purge
    by the receiver (which then starts the study anew)."""
    data = tmp_path / "data"
    config = config_for(tmp_path, instances_days=0, purge_below_free_mb=0)
    first, second = add_study(engine, data, "1.1", 1)
    purge = retention.Purge("1.1", "instances", "test", NOW - DAY)
    planned_at = db.now()
    second.write_bytes(b"late")
    if row_recorded:
        with engine.begin() as connection:
            connection.execute(db.instances.update().where(db.instances.c.path == str(second))
                               .values(received_at=planned_at + 1))
    outcome = retention.apply(config, engine, purge, planned_at)
    assert outcome.files == 1 and not first.exists()
    assert second.read_bytes() == b"late"
    with db.reading(engine) as connection:
        rows = connection.execute(select(db.instances.c.path)).scalars().all()
    assert rows == ([str(second)] if row_recorded else [])


def test_a_study_that_is_no_longer_finished_is_left_whole(tmp_path, engine):
    data = tmp_path / "data"
    config = config_for(tmp_path, instances_days=0, purge_below_free_mb=0)
    paths = add_study(engine, data, "1.1", 1)
    purge = retention.Purge("1.1", "instances", "test", NOW - DAY)
    with engine.begin() as connection:  # a late instance re-opened it after the plan
        connection.execute(db.studies.update().values(state="receiving"))
    assert retention.apply(config, engine, purge, db.now()) is None
    assert all(path.exists() for path in paths)


def test_the_policy_is_refused_when_it_would_drop_rows_before_files_or_purge_after_storing_stops(tmp_path):
    with pytest.raises(ValidationError, match="records_days"):
        config_for(tmp_path, instances_days=400, records_days=365)
    with pytest.raises(ValidationError, match="must be at least node.min_free_disk_mb"):
        config_for(tmp_path, min_free_disk_mb=1024, purge_below_free_mb=512)
    assert config_for(tmp_path, min_free_disk_mb=1024).purge_below_free_mb == 2048
    assert config_for(tmp_path, min_free_disk_mb=1024, purge_below_free_mb=0).purge_below_free_mb == 0
