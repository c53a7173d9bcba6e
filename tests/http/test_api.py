"""The REST API's contract, against a real node with the demo model, a real Orthanc as the PACS
and a real HTTP server as a team's webhook endpoint.

Two studies go through the node; the tests then read them back through the API as a script
would, act on them as an operator would, and check what the webhook endpoint got.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import time

import httpx
import pytest

from tests.support.ct_study import DEMO_BUNDLE, small_study
from tests.support.peers import free_port, start_node, start_orthanc, storescu, wait_for, write_node_config
from tests.support.web import WebhookReceiver, csrf_of

SECRET = "a shared secret"


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """A node that has processed two studies; yields (node, orthanc, studies, webhook receiver)."""
    workdir = tmp_path_factory.mktemp("api")
    port = free_port()
    orthanc = start_orthanc(workdir / "orthanc", {"node": ["DICOMNODE", "127.0.0.1", port]})
    hooks = WebhookReceiver()
    config = write_node_config(
        workdir / "node", port,
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
        pipelines=[{"name": "ct-demo", "model": str(DEMO_BUNDLE), "destinations": ["pacs"],
                    "select": {"Modality": "CT"}}],
        webhooks=[{"url": hooks.url, "secret": SECRET, "events": ["study.done", "study.failed"]}],
        stable_after=2, min_free_disk_mb=0,
    )
    node = start_node(config, port)
    node.wait_for_http()
    studies = []
    try:
        for seed in (3, 4):
            info, paths = small_study(workdir / f"study{seed}", slices=24, seed=seed)
            assert storescu("DICOMNODE", port, paths).returncode == 0
            studies.append((info, paths))
        with httpx.Client(base_url=node.http_url) as client:
            wait_for(lambda: [s["status"] for s in client.get("/api/studies").json()["studies"]] == ["done", "done"],
                     300, "both studies done", 1.0)
        yield node, orthanc, studies, hooks
    finally:
        node.stop()
        orthanc.stop()
        hooks.stop()


@pytest.fixture
def client(flow):
    node = flow[0]
    with httpx.Client(base_url=node.http_url, timeout=60) as session:
        yield session


def test_the_webhook_endpoint_gets_study_done_once_per_study_signed(flow):
    """First of the module: the other tests rerun and re-send, after which a study ends again,
    which is news again (docs/operations.md)."""
    _, _, studies, hooks = flow
    expected = {info.study_uid for info, _ in studies}
    wait_for(lambda: {json.loads(p.body)["study_uid"] for p in hooks.posts} >= expected, 60, "the webhooks", 0.5)
    time.sleep(2)  # the notifier looks ten times a second: more looks, no more posts
    assert sorted(json.loads(p.body)["study_uid"] for p in hooks.posts) == sorted(expected)
    for post in hooks.posts:
        body = json.loads(post.body)
        signed = post.headers["x-dicom-node-timestamp"].encode() + b"." + post.body
        assert post.headers["x-dicom-node-signature"] == \
            "sha256=" + hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
        assert body["event"] == "study.done" and post.headers["x-dicom-node-event"] == "study.done"
        assert body["status"] == "done" and body["jobs"][0]["state"] == "done"


def test_studies_are_listed_with_their_state_filtered_and_paginated(flow, client):
    _, _, studies, _ = flow
    listed = client.get("/api/studies").json()
    assert listed["total"] == 2
    assert {s["study_uid"] for s in listed["studies"]} == {info.study_uid for info, _ in studies}
    assert all(s["status"] == "done" and s["instances"] == 24 for s in listed["studies"])
    assert client.get("/api/studies", params={"state": "failed"}).json()["total"] == 0
    assert client.get("/api/studies", params={"state": "done", "limit": 1}).json()["total"] == 2
    first = client.get("/api/studies", params={"limit": 1}).json()["studies"]
    second = client.get("/api/studies", params={"limit": 1, "offset": 1}).json()["studies"]
    assert len(first) == len(second) == 1 and first[0]["study_uid"] != second[0]["study_uid"]
    assert client.get("/api/studies", params={"received_from": "2999-01-01"}).json()["total"] == 0
    study_date = listed["studies"][0]["study_date"]
    assert client.get("/api/studies", params={"study_date_from": study_date, "study_date_to": study_date}
                      ).json()["total"] == 2
    assert client.get("/api/studies", params={"study_date_to": "19991231"}).json()["total"] == 0
    patient = listed["studies"][0]["patient_id"]
    assert client.get("/api/studies", params={"patient_id": patient}).json()["total"] == 2
    assert client.get("/api/studies", params={"patient_id": "nobody"}).json()["total"] == 0
    assert client.get("/api/studies", params={"state": "lost"}).status_code == 422
    assert client.get("/api/studies", params={"received_from": "yesterday"}).status_code == 422


def test_one_study_has_its_series_jobs_results_deliveries_and_events(flow, client):
    _, orthanc, studies, _ = flow
    info = studies[0][0]
    study = client.get(f"/api/studies/{info.study_uid}").json()
    assert study["status"] == "done" and len(study["series"]) == 1 and study["series"][0]["instances"] == 24
    (job,) = study["jobs"]
    assert job["pipeline"] == "ct-demo" and job["state"] == "done"
    kinds = {result["kind"]: result for result in job["results"]}
    assert {"SEG", "SR"} <= kinds.keys()
    assert all(d["destination"] == "pacs" and d["state"] == "sent" for r in job["results"] for d in r["deliveries"])
    messages = [event["message"] for event in study["events"]]
    assert any("timings" in m for m in messages) and any("delivered SEG to pacs" in m for m in messages)
    assert client.get("/api/studies/1.2.3.4.5").status_code == 404
    assert {"SEG", "SR"} <= orthanc.modality_counts(info.study_uid).keys()


def test_the_openapi_description_covers_the_api(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    for path in ("/api/studies", "/api/studies/{study_uid}", "/api/jobs/{job_id}/{action}",
                 "/api/results/{result_id}/resend", "/api/pipelines", "/api/destinations", "/api/rule-test",
                 "/api/studies/{study_uid}/explain", "/api/audit", "/readyz"):
        assert path in paths, path


def test_explain_and_the_rule_tester_answer_as_the_command_line_does(flow, client):
    node, _, studies, _ = flow
    info, paths = studies[1]
    by_command = node.cli("explain", info.study_uid).rstrip("\n")
    assert client.get(f"/api/studies/{info.study_uid}/explain").json()["text"] == by_command
    files = [("files", (path.name, path.read_bytes(), "application/dicom")) for path in paths]
    answer = client.post("/api/rule-test", files=files, headers={"X-CSRF-Token": csrf_of(client)}).json()
    assert answer["text"] == by_command.split("\n", 1)[1]
    assert "ct-demo" in answer["text"] and answer["refused"] == []
    not_dicom = client.post("/api/rule-test", files=[("files", ("notes.txt", b"hello", "text/plain"))],
                            headers={"X-CSRF-Token": csrf_of(client)}).json()
    assert not_dicom["refused"][0]["file"] == "notes.txt"


def test_an_action_from_a_page_of_another_site_is_refused(flow, client):
    job = client.get(f"/api/studies/{flow[2][0][0].study_uid}").json()["jobs"][0]
    refused = client.post(f"/api/jobs/{job['id']}/rerun")
    assert refused.status_code == 403 and "CSRF" in refused.text
    assert client.post(f"/api/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": csrf_of(client)}).status_code == 409


def test_rerun_and_resend_from_the_api_are_done_and_audited(flow, client):
    node, _, studies, _ = flow
    info = studies[0][0]
    job = client.get(f"/api/studies/{info.study_uid}").json()["jobs"][0]
    token = csrf_of(client)
    assert client.post(f"/api/jobs/{job['id']}/rerun", headers={"X-CSRF-Token": token}).json()["done"]
    wait_for(lambda: client.get(f"/api/studies/{info.study_uid}").json()["status"] == "done"
             and client.get(f"/api/studies/{info.study_uid}").json()["jobs"][0]["state"] == "done", 240,
             "the rerun to finish", 1.0)
    results = client.get(f"/api/studies/{info.study_uid}").json()["jobs"][0]["results"]
    assert sum(r["superseded"] for r in results) >= 2, "the rerun's SEG and SR supersede the first ones"
    newest_seg = next(r for r in results if r["kind"] == "SEG" and not r["superseded"])
    resent = client.post(f"/api/results/{newest_seg['id']}/resend", headers={"X-CSRF-Token": token})
    assert resent.json()["deliveries"] == 1
    wait_for(lambda: node.query("SELECT state FROM deliveries WHERE result_id = ?", newest_seg["id"]) == [("sent",)],
             60, "the result sent again", 0.5)
    rows = list(csv.DictReader(io.StringIO(client.get(f"/api/studies/{info.study_uid}/audit",
                                                      params={"format": "csv"}).text)))
    by_operator = [row for row in rows if row["actor"] != "node"]
    assert [row["message"] for row in by_operator] == [
        f"job {job['id']} re-run by an operator", f"SEG {newest_seg['sop_instance_uid']} to be sent again by an operator"]
    assert all(row["address"] == "127.0.0.1" and row["actor"].startswith("anonymous") for row in by_operator)
    as_json = json.loads(client.get(f"/api/studies/{info.study_uid}/audit").text)
    assert [row["message"] for row in as_json] == [row["message"] for row in rows]


def test_pipelines_and_destinations_report_the_last_day(client):
    (pipeline,) = client.get("/api/pipelines").json()
    assert pipeline["pipeline"] == "ct-demo" and pipeline["done"] >= 2 and pipeline["failed"] == 0
    assert pipeline["latency_p50_s"] > 0 and pipeline["failure_rate"] == 0
    assert sum(hour["done"] for hour in pipeline["hours"]) == pipeline["done"]
    (destination,) = client.get("/api/destinations").json()
    assert destination["name"] == "pacs" and destination["sent"] >= 4 and destination["healthy"]


def test_health_and_readiness(flow, client):
    assert client.get("/healthz").text == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert set(ready.json()["checks"]) == {"dicom_listener", "database", "workers", "disk"}
