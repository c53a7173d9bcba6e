"""What the operator's seat decides without the network: which state changes webhooks announce
(once each), what an action does to a job or a result, what the configuration page hides, and
where a form may send the browser back to."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select, update

from dicom_node.config import Config
from dicom_node.http import webhooks
from dicom_node.http.api import public_config
from dicom_node.http.dashboard import _back
from dicom_node.metrics import MAX_CALLING_AE_LABELS, _calling_label
from dicom_node.state import actions, db, jobs, overview
from dicom_node.state.audit import Operator

STUDY = "1.2.3.4"
OPERATOR = Operator("ana", "10.0.0.7")


@pytest.fixture
def engine(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path / 'node.sqlite'}")
    with engine.begin() as connection:
        connection.execute(db.studies.insert().values(study_uid=STUDY, state="complete", first_received_at=1.0,
                                                      last_received_at=2.0))
        jobs.enqueue(connection, STUDY, "1.2.3.4.1", "", "ct-demo")
    return engine


def config(*events: str) -> Config:
    return Config.model_validate({"webhooks": [{"url": "http://127.0.0.1:9/hook", "secret": "k",
                                                "events": list(events)}]})


def posts(engine) -> list[tuple[str, str]]:
    with db.reading(engine) as connection:
        return [(row.event, row.study_uid) for row in connection.execute(select(db.webhook_posts))]


def finish_job(engine, state: str) -> None:
    with engine.begin() as connection:
        jobs.finish(connection, 1, STUDY, state, "the model could not take it" if state == "failed" else None)


def test_a_study_that_ends_is_announced_once_however_often_the_notifier_looks(engine):
    hooks = config("study.done", "study.failed")
    webhooks.announce(hooks, engine)  # the first look only places the cursor
    finish_job(engine, "done")
    assert webhooks.announce(hooks, engine) == 1
    assert webhooks.announce(hooks, engine) == 0
    with engine.begin() as connection:  # nothing changes its state, yet an event names it
        db.log_event(connection, STUDY, "info", "looked at by an operator")
    assert webhooks.announce(hooks, engine) == 0
    assert posts(engine) == [("study.done", STUDY)]


def test_a_study_run_again_is_news_again_and_failure_too(engine):
    hooks = config("study.done", "study.failed")
    webhooks.announce(hooks, engine)
    finish_job(engine, "done")
    webhooks.announce(hooks, engine)
    assert jobs.rerun(engine, [STUDY], OPERATOR) == 1
    webhooks.announce(hooks, engine)  # queued: not an end
    with engine.begin() as connection:
        connection.execute(update(db.jobs).values(state="running"))
    finish_job(engine, "failed")
    webhooks.announce(hooks, engine)
    assert posts(engine) == [("study.done", STUDY), ("study.failed", STUDY)]
    with db.reading(engine) as connection:
        body = json.loads(connection.execute(select(db.webhook_posts.c.payload).order_by(db.webhook_posts.c.id.desc())
                                             ).scalar())
    assert body["status"] == "failed" and body["jobs"][0]["reason"] == "the model could not take it"


def test_only_subscribed_events_are_queued_and_a_dead_delivery_is_announced_once(engine):
    hooks = config("delivery.dead")
    webhooks.announce(hooks, engine)
    finish_job(engine, "done")
    with engine.begin() as connection:
        result = connection.execute(db.results.insert().values(
            job_id=1, kind="SEG", sop_instance_uid="1.2.3.4.9", series_uid="1.2.3.4.8", path="/x", created_at=3.0)
        ).inserted_primary_key[0]
        connection.execute(db.deliveries.insert().values(result_id=result, destination="pacs", state="dead",
                                                         attempts=5, not_before=0.0, last_error="refused"))
        db.log_event(connection, STUDY, "error", "gave up delivering SEG to pacs")
    assert webhooks.announce(hooks, engine) == 1
    with engine.begin() as connection:
        db.log_event(connection, STUDY, "info", "another event")
    assert webhooks.announce(hooks, engine) == 0
    assert posts(engine) == [("delivery.dead", STUDY)]


def test_a_post_that_fails_is_retried_with_backoff_then_given_up(engine):
    hooks = Config.model_validate({"webhooks": [{"url": "http://127.0.0.1:9/hook", "max_attempts": 2}]})
    webhooks.announce(hooks, engine)
    finish_job(engine, "done")
    webhooks.announce(hooks, engine)
    assert webhooks.post_due(hooks, engine) == 0  # nothing listens on port 9
    with db.reading(engine) as connection:
        first = connection.execute(select(db.webhook_posts)).mappings().one()
    assert first["state"] == "pending" and first["attempts"] == 1 and first["not_before"] > db.now()
    with engine.begin() as connection:
        connection.execute(update(db.webhook_posts).values(not_before=0.0))
    webhooks.post_due(hooks, engine)
    with db.reading(engine) as connection:
        assert connection.execute(select(db.webhook_posts.c.state)).scalar() == "dead"
        given_up = connection.execute(select(db.events.c.message).where(db.events.c.level == "error")).scalars().all()
    assert any("given up after 2 attempt(s)" in message for message in given_up)


def test_of_two_nodes_that_read_the_same_due_post_and_the_same_ended_study_one_acts(tmp_path, database_url):
    """Nodes sharing one database (PostgreSQL, or SQLite on one host) each run the webhook loops:
    each compares and sets, so that what both read is queued and posted once."""
    engine = db.connect(database_url)
    with engine.begin() as connection:
        connection.execute(db.studies.insert().values(study_uid=STUDY, state="complete", first_received_at=1.0,
                                                      last_received_at=2.0))
    hooks = config("study.done")
    with db.reading(engine) as connection:  # both nodes read the study before either announces
        seen = connection.execute(select(db.studies).where(db.studies.c.study_uid == STUDY)).mappings().one()
    queued = []
    for _ in range(2):
        with engine.begin() as connection:
            queued.append(webhooks._announce_study(hooks, connection, STUDY, "done", seen))
    assert queued == [1, 0] and len(posts(engine)) == 1
    with db.reading(engine) as connection:  # both read the post as due
        due = connection.execute(select(db.webhook_posts)).mappings().all()
    assert [len(webhooks._claim(engine, due)) for _ in range(2)] == [1, 0]


def test_cancel_takes_a_queued_job_out_and_the_study_goes_on_without_it(engine):
    actions.cancel_job(engine, 1, OPERATOR)
    with db.reading(engine) as connection:
        assert connection.execute(select(db.jobs.c.state)).scalar() == "cancelled"
        assert overview.study_states(connection) == {STUDY: "done"}
        actor = connection.execute(select(db.events.c.actor, db.events.c.address)
                                   .where(db.events.c.message.like("%cancelled%"))).one()
    assert tuple(actor) == ("ana", "10.0.0.7")
    with pytest.raises(actions.ActionRefused, match="only a queued or running job is cancelled"):
        actions.cancel_job(engine, 1, OPERATOR)
    with pytest.raises(actions.ActionRefused, match="only a failed job is retried"):
        actions.retry_job(engine, 1, OPERATOR)
    actions.rerun_job(engine, 1, OPERATOR)
    with pytest.raises(actions.NotFound):
        actions.rerun_job(engine, 99, OPERATOR)
    with pytest.raises(actions.NotFound):
        actions.resend_result(engine, 99, OPERATOR)


def test_the_configuration_page_hides_secrets():
    shown = public_config(Config.model_validate({"webhooks": [{"url": "https://chat.example/hook",
                                                               "secret": "do not show"}]}))
    assert shown["webhooks"][0]["secret"] == "***" and shown["webhooks"][0]["url"] == "https://chat.example/hook"
    assert "do not show" not in json.dumps(shown)
    with_password = public_config(Config.model_validate({"database": {"url": "postgresql://node:s3cret@db:5432/n"}}))
    assert with_password["database"]["url"] == "postgresql://node:***@db:5432/n"


def test_a_form_sends_the_browser_back_only_to_this_server():
    assert _back("/studies/1.2.3") == "/studies/1.2.3"
    for elsewhere in ("https://evil.example/", "//evil.example/", "javascript:alert(1)", None, ""):
        assert _back(elsewhere) == "/"


def test_calling_ae_titles_from_the_network_cannot_grow_the_metrics_without_bound():
    labels = {_calling_label(f"SCU{i}") for i in range(MAX_CALLING_AE_LABELS * 2)}
    assert len(labels) <= MAX_CALLING_AE_LABELS + 1 and "other" in labels
