"""Workers as an operator runs them: warm models, several pipelines per study, time limits, a worker that dies."""

from __future__ import annotations

import os
import signal
import time

from tests.support.ct_study import DEMO_BUNDLE, small_study
from tests.support.peers import start_node, storescu, wait_for, write_node_config


def demo_pipeline(name: str, **options) -> dict:
    return {"name": name, "model": str(DEMO_BUNDLE), "select": {"Modality": "CT"}, **options}


def test_a_worker_loads_each_model_once_and_every_pipeline_writes_its_own_series(tmp_path, node_port):
    config = write_node_config(tmp_path / "node", node_port, destinations=[],
                               pipelines=[demo_pipeline("body"), demo_pipeline("body-again")],
                               stable_after=2, min_free_disk_mb=0)  # counts jobs: no second completion
    node = start_node(config, node_port)
    try:
        studies = [small_study(tmp_path / f"study{i}", slices=16, seed=i)[1] for i in range(3)]
        for paths in studies:
            assert storescu(node.ae_title, node.port, paths).returncode == 0
        wait_for(lambda: node.query("SELECT count(*) FROM jobs WHERE state = 'done'") == [(6,)], 240, "six jobs")
        loads = node.query("SELECT message FROM events WHERE message LIKE '%loaded bundle%'")
        assert len(loads) == 2, loads  # one per pipeline, none for the four jobs after
        series_numbers = node.query(
            "SELECT jobs.pipeline, results.kind, count(DISTINCT results.series_uid) FROM results "
            "JOIN jobs ON jobs.id = results.job_id GROUP BY jobs.pipeline, results.kind"
        )
        assert sorted(series_numbers) == [("body", "SEG", 3), ("body", "SR", 3), ("body-again", "SEG", 3),
                                          ("body-again", "SR", 3)]
        timings = node.query("SELECT message FROM events WHERE message LIKE '%timings%'")
        assert len(timings) == 6 and "network" in timings[0][0]
        log = node.log()
        assert "FutureWarning" not in log and "UserWarning" not in log, "library notices stay out of the log"
        assert "ready: body on cpu, body-again on cpu" in log, "the worker says once which devices it uses"
    finally:
        node.stop()


def test_a_job_over_its_time_limit_fails_with_that_reason(tmp_path, node_port):
    config = write_node_config(tmp_path / "node", node_port, destinations=[],
                               pipelines=[demo_pipeline("slow", timeout_seconds=0.05)],
                               stable_after=1, min_free_disk_mb=0)
    node = start_node(config, node_port)
    try:
        _info, paths = small_study(tmp_path / "study", slices=40)
        assert storescu(node.ae_title, node.port, paths).returncode == 0
        states = wait_for(node.finished_job_states, 120, "the job to fail")
        assert set(states) == {"failed"}, states
        assert "exceeded the time limit of 0.05 s" in node.cli("status")
        assert node.echo()
    finally:
        node.stop()


def test_a_worker_loads_its_bundles_before_the_first_study_and_disables_a_broken_one(tmp_path, node_port):
    not_a_bundle = tmp_path / "not-a-bundle"
    not_a_bundle.mkdir()
    pipelines = [{"name": "broken", "model": str(not_a_bundle), "select": {"Modality": "CT"}}, demo_pipeline("body")]
    config = write_node_config(tmp_path / "node", node_port, destinations=[], pipelines=pipelines,
                               stable_after=1, min_free_disk_mb=0)
    node = start_node(config, node_port)
    try:
        wait_for(node.ready_workers, 120, "the worker")
        loads = node.query("SELECT study_uid, message FROM events WHERE message LIKE '%loaded bundle%'")
        assert [(study, message.endswith(" for body")) for study, message in loads] == [(None, True)]
        assert f"pipeline broken disabled: its bundle {not_a_bundle} failed the check: {not_a_bundle} has no " \
               "configs/metadata.json: is it a bundle directory?" in node.log()
        assert node.query("SELECT pipeline, ready FROM pipeline_checks ORDER BY pipeline") == [("body", 1), ("broken", 0)]
    finally:
        node.stop()


def test_a_killed_worker_is_replaced_and_the_next_study_is_processed(tmp_path, node_port):
    config = write_node_config(tmp_path / "node", node_port, destinations=[], pipelines=[demo_pipeline("body")],
                               stable_after=2, min_free_disk_mb=0)
    node = start_node(config, node_port)
    try:
        ready = wait_for(node.ready_workers, 120, "the worker")
        os.kill(ready[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
        wait_for(lambda: len(node.ready_workers()) == 2, 120, "a new worker")
        assert f"worker {ready[0]} exited with -9; restarting it" in node.log()
        _, paths = small_study(tmp_path / "study", slices=16)
        assert storescu(node.ae_title, node.port, paths).returncode == 0
        assert set(wait_for(node.finished_job_states, 120, "the job")) == {"done"}
        assert node.echo()
    finally:
        node.stop()


def test_a_job_that_fails_near_its_time_limit_is_recorded_without_the_alarm_cutting_in(tmp_path, monkeypatch):
    """The alarm of timeout_seconds is disarmed before a failure is recorded: one that came
    while the failure was being written would take the worker down with it."""
    from dicom_node.compute import worker
    from dicom_node.state import db, jobs
    from tests.support.ct_study import StudyInfo, ct_series, make_phantom
    from tests.support.received import stored_by_receiver

    images = ct_series(make_phantom((32, 32, 4), (4.0, 4.0, 4.0), seed=3), StudyInfo(), 2, "alarm")
    config, engine = stored_by_receiver(tmp_path, images, stable_after=60)
    config = config.model_copy(update={"pipelines": [config.pipelines[0].model_copy(update={"timeout_seconds": 0.3})]})
    with engine.begin() as connection:
        jobs.enqueue(connection, images[0].StudyInstanceUID, images[0].SeriesInstanceUID, "no such stack", "ct")
    finish = jobs.finish

    def slow_finish(*args, **kwargs):
        time.sleep(0.6)  # past the time limit, while the failure is recorded
        return finish(*args, **kwargs)

    monkeypatch.setattr(jobs, "finish", slow_finish)
    previous = signal.signal(signal.SIGALRM, worker._raise_timeout)
    try:
        assert worker.Worker(config, engine).run_once()
    finally:
        signal.signal(signal.SIGALRM, previous)
    with db.reading(engine) as connection:
        [(state, reason)] = connection.execute(db.jobs.select().with_only_columns(db.jobs.c.state, db.jobs.c.reason))
    assert state == "failed" and "no such stack" in reason
