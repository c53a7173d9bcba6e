"""Webhooks: a JSON POST when a study ends (``study.done``, ``study.failed``) or a result's
delivery is given up (``delivery.dead``), so that a team can wire Teams, Slack or a pager.

Two steps, each a loop of the main process. `announce` reads the events written since it last
looked, works out which studies changed, and for each one that has ended (and was not already
announced in that state) queues one post per subscribed webhook, in the same transaction as
it marks the study announced: a post is queued once, whatever stops the node in between.
`post_due` sends queued posts, retrying with backoff and giving up after ``max_attempts``.

Each post is signed when the webhook has a ``secret``: ``X-Dicom-Node-Signature: sha256=HEX``,
the HMAC-SHA256 of ``TIMESTAMP.BODY`` with ``X-Dicom-Node-Timestamp`` as TIMESTAMP, so that a
receiver can check the sender and refuse a replayed post.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request

from sqlalchemy import Engine, select, update

from dicom_node.config import Config, Webhook
from dicom_node.state import db, overview

log = logging.getLogger(__name__)

CURSOR = "webhooks"
EVENTS_PER_ROUND = 1000
RETRY_FIRST_SECONDS = 2.0
RETRY_MAX_SECONDS = 300.0
CLAIM_SECONDS = 300.0  # a claimed post is another node's to send after this long (more than a timeout: 120 s)
SIGNATURE_HEADER = "X-Dicom-Node-Signature"
TIMESTAMP_HEADER = "X-Dicom-Node-Timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def announce(config: Config, engine: Engine) -> int:
    """Queue the posts for what ended since the last round; returns how many were queued."""
    if not config.webhooks:
        return 0
    queued = 0
    with engine.begin() as connection:
        cursor = connection.execute(select(db.cursors.c.position).where(db.cursors.c.name == CURSOR)).scalar()
        if cursor is None:
            # A node that gets its first webhook announces what ends from now on, not its history.
            cursor = connection.execute(select(db.events.c.id).order_by(db.events.c.id.desc()).limit(1)).scalar() or 0
            connection.execute(db.cursors.insert().values(name=CURSOR, position=cursor))
        touched = connection.execute(
            select(db.events.c.id, db.events.c.study_uid).where(db.events.c.id > cursor)
            .order_by(db.events.c.id).limit(EVENTS_PER_ROUND)).all()
        if not touched:
            return 0
        study_uids = {study_uid for _, study_uid in touched if study_uid}
        states = overview.study_states(connection, study_uids)
        for study_uid in sorted(study_uids):
            queued += _announce_study(config, connection, study_uid, states.get(study_uid))
        queued += _announce_dead_deliveries(config, connection, study_uids)
        connection.execute(update(db.cursors).where(db.cursors.c.name == CURSOR).values(position=touched[-1][0]))
    return queued


def _announce_study(config: Config, connection, study_uid: str, state: str | None, study=None) -> int:
    """Queue the post for a study that ended in ``state``; ``study``, its row as read (read here
    when not given)."""
    if study is None:
        study = connection.execute(select(db.studies).where(db.studies.c.study_uid == study_uid)).mappings().first()
    if study is None or state is None:
        return 0
    if state not in ("done", "failed"):
        if study["announced_state"] is not None:  # re-opened: its next end is news again
            connection.execute(update(db.studies).where(db.studies.c.study_uid == study_uid)
                               .values(announced_state=None))
        return 0
    if study["announced_state"] == state:
        return 0
    # On the condition that it still holds what was read: of nodes that share the database and
    # announce at the same moment, one queues the post.
    if not connection.execute(update(db.studies).where(db.studies.c.study_uid == study_uid,
                                                       _same(db.studies.c.announced_state, study["announced_state"]))
                              .values(announced_state=state)).rowcount:
        return 0
    jobs = connection.execute(
        select(db.jobs.c.id, db.jobs.c.pipeline, db.jobs.c.series_uid, db.jobs.c.state, db.jobs.c.reason)
        .where(db.jobs.c.study_uid == study_uid).order_by(db.jobs.c.id)).mappings().all()
    payload = {
        "event": f"study.{state}", "study_uid": study_uid, "status": state,
        "patient_id": study["patient_id"], "accession_number": study["accession_number"],
        "reason": study["reason"], "jobs": [dict(job) for job in jobs],
    }
    return _queue(config, connection, f"study.{state}", study_uid, payload)


def _announce_dead_deliveries(config: Config, connection, study_uids: set[str]) -> int:
    dead = connection.execute(
        select(db.deliveries.c.id, db.deliveries.c.destination, db.deliveries.c.attempts, db.deliveries.c.last_error,
               db.results.c.kind, db.results.c.sop_instance_uid, db.jobs.c.study_uid, db.jobs.c.pipeline)
        .join(db.results, db.results.c.id == db.deliveries.c.result_id)
        .join(db.jobs, db.jobs.c.id == db.results.c.job_id)
        .where(db.deliveries.c.state == "dead", db.deliveries.c.announced_at.is_(None),
               db.jobs.c.study_uid.in_(study_uids))).mappings().all()
    queued = 0
    for row in dead:
        if not connection.execute(update(db.deliveries).where(db.deliveries.c.id == row["id"],
                                                              db.deliveries.c.announced_at.is_(None))
                                  .values(announced_at=db.now())).rowcount:
            continue  # another node announced it
        payload = {"event": "delivery.dead", "study_uid": row["study_uid"], "delivery": dict(row)}
        queued += _queue(config, connection, "delivery.dead", row["study_uid"], payload)
    return queued


def _same(column, value):
    return column.is_(None) if value is None else column == value


def _queue(config: Config, connection, event: str, study_uid: str, payload: dict) -> int:
    payload = {**payload, "node": config.node.ae_title, "at": db.now()}
    body = json.dumps(payload, default=str)
    subscribed = [hook for hook in config.webhooks if event in hook.events]
    for hook in subscribed:
        connection.execute(db.webhook_posts.insert().values(
            url=hook.url, event=event, study_uid=study_uid, payload=body, state="pending", attempts=0,
            not_before=0.0, created_at=db.now()))
    return len(subscribed)


def post_due(config: Config, engine: Engine) -> int:
    """Send the posts that are due, oldest first; returns how many were sent."""
    with db.reading(engine) as connection:
        due = connection.execute(
            select(db.webhook_posts).where(db.webhook_posts.c.state == "pending",
                                           db.webhook_posts.c.not_before <= db.now())
            .order_by(db.webhook_posts.c.id).limit(100)).mappings().all()
    hooks = {hook.url: hook for hook in config.webhooks}
    sent = 0
    for post in _claim(engine, due):
        hook = hooks.get(post["url"])
        error = "the webhook is no longer configured" if hook is None else _post(hook, post)
        with engine.begin() as connection:
            if error is None:
                connection.execute(update(db.webhook_posts).where(db.webhook_posts.c.id == post["id"])
                                   .values(state="sent", attempts=post["attempts"] + 1, sent_at=db.now(),
                                           last_error=None))
                sent += 1
                continue
            attempts = post["attempts"] + 1
            give_up = hook is None or attempts >= hook.max_attempts
            delay = min(RETRY_FIRST_SECONDS * 2 ** (attempts - 1), RETRY_MAX_SECONDS)
            connection.execute(update(db.webhook_posts).where(db.webhook_posts.c.id == post["id"]).values(
                state="dead" if give_up else "pending", attempts=attempts, last_error=error,
                not_before=db.now() + delay))
            if give_up:
                db.log_event(connection, post["study_uid"], "error",
                             f"webhook {post['event']} to {post['url']} given up after {attempts} attempt(s): {error}")
                log.error("webhook %s to %s given up: %s", post["event"], post["url"], error)
    return sent


def _claim(engine: Engine, due) -> list:
    """The posts this node is to send: each taken by moving its not_before past the time a post
    may take, on the condition that no other node sharing the database took it first. A node
    that dies with a claim leaves the post to be sent once the claim runs out."""
    held = db.claim_due(engine, db.webhook_posts, [(post["id"], post["not_before"]) for post in due],
                        db.now() + CLAIM_SECONDS)
    return [post for post in due if post["id"] in held]


def _post(hook: Webhook, post) -> str | None:
    """POST one event; None when the receiver answered 2xx, else what went wrong."""
    body = post["payload"].encode()
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "dicom-node", "X-Dicom-Node-Event": post["event"],
               "X-Dicom-Node-Delivery": str(post["id"]), TIMESTAMP_HEADER: timestamp}
    if hook.secret:
        headers[SIGNATURE_HEADER] = sign(hook.secret, timestamp, body)
    request = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=hook.timeout_seconds) as response:
            response.read(64 * 1024)
            return None
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code} {error.reason}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        return str(getattr(error, "reason", error))
