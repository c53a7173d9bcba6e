"""Listening beyond 127.0.0.1 requires credentials: tokens and passwords made with the command
line, roles that limit what each may do, a login form with CSRF protection, and an audit trail
that names who did what from where."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from tests.support.ct_study import small_study
from tests.support.peers import ROOT, free_port, start_node, storescu, wait_for, write_node_config

PASSWORD = "correct horse battery"


def dicom_node(config, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, input=stdin, cwd=ROOT, timeout=60, check=False)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A node listening on every address, with a viewer, an admin and an operator's token."""
    workdir = tmp_path_factory.mktemp("auth")
    port = free_port()
    config = write_node_config(workdir / "node", port, destinations=[], pipelines=[], stable_after=1,
                               min_free_disk_mb=0, http={"host": "0.0.0.0", "port": free_port()})
    assert dicom_node(config, "user", "add", "alice", "--role", "viewer", stdin=PASSWORD + "\n").returncode == 0
    assert dicom_node(config, "user", "add", "root", "--role", "admin", stdin=PASSWORD + "\n").returncode == 0
    made = dicom_node(config, "token", "create", "ris-bridge", "--role", "operator")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    too_short = dicom_node(config, "user", "add", "bob", "--role", "viewer", stdin="short\n")
    assert too_short.returncode == 2 and "at least 8 characters" in too_short.stderr
    node = start_node(config, port)
    node.wait_for_http()
    info, paths = small_study(workdir / "study", slices=4)
    assert storescu("DICOMNODE", port, paths).returncode == 0
    wait_for(lambda: node.query("SELECT state FROM studies") == [("complete",)], 60, "the study complete", 0.5)
    try:
        yield node, info, token
    finally:
        node.stop()


def test_without_credentials_every_door_but_health_answers_401(guarded):
    node, info, _ = guarded
    with httpx.Client(base_url=node.http_url) as anonymous:
        for path in ("/api/studies", f"/api/studies/{info.study_uid}", "/api/audit", "/metrics", "/api/config"):
            answer = anonymous.get(path)
            assert answer.status_code == 401, path
            assert "Bearer" in answer.headers["www-authenticate"]
        assert anonymous.post(f"/api/studies/{info.study_uid}/retry").status_code == 401
        assert anonymous.get("/healthz").status_code == 200
        page = anonymous.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        assert anonymous.get("/api/studies", headers={"Authorization": "Bearer dn_forged"}).status_code == 401
        assert anonymous.get("/api/studies", auth=("alice", "not her password")).status_code == 401


def test_a_viewer_reads_but_may_not_act(guarded):
    node, info, _ = guarded
    with httpx.Client(base_url=node.http_url, auth=("alice", PASSWORD)) as viewer:
        assert viewer.get("/api/studies").json()["total"] == 1
        refused = viewer.post(f"/api/studies/{info.study_uid}/rerun")
        assert refused.status_code == 403 and "operator" in refused.text
        assert viewer.get("/api/config").status_code == 403
        assert viewer.get("/metrics").status_code == 200


def test_an_operator_token_acts_and_the_audit_trail_names_it(guarded):
    node, info, token = guarded
    with httpx.Client(base_url=node.http_url, headers={"Authorization": f"Bearer {token}"}) as bot:
        assert bot.post(f"/api/studies/{info.study_uid}/retry").status_code == 200
        trail = bot.get(f"/api/studies/{info.study_uid}/audit").json()
    acted = [row for row in trail if row["actor"] != "node"]
    assert acted and all(row["actor"] == "token ris-bridge" and row["address"] == "127.0.0.1" for row in acted)


def test_the_admin_sees_the_configuration_with_secrets_hidden(guarded):
    node, _, _ = guarded
    with httpx.Client(base_url=node.http_url, auth=("root", PASSWORD)) as admin:
        config = admin.get("/api/config").json()
    assert config["http"]["host"] == "0.0.0.0" and config["node"]["ae_title"] == "DICOMNODE"


def test_the_login_form_opens_a_session_and_needs_its_csrf_token(guarded):
    node, _, _ = guarded
    with httpx.Client(base_url=node.http_url) as browser:
        form = browser.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        forged = browser.post("/login", data={"username": "alice", "password": PASSWORD}, follow_redirects=False)
        assert forged.status_code == 403, "a login without the form's token is refused"
        wrong = browser.post("/login", data={"username": "alice", "password": "guess", "csrf_token": csrf},
                             follow_redirects=False)
        assert wrong.status_code == 303 and "wrong+user+or+password" in wrong.headers["location"]
        logged_in = browser.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": csrf,
                                                 "next": "/studies"}, follow_redirects=False)
        assert logged_in.status_code == 303 and logged_in.headers["location"] == "/studies"
        page = browser.get("/studies")
        assert page.status_code == 200 and "alice (viewer)" in page.text
        assert browser.get("/config").status_code == 403
    logins = node.query("SELECT actor, message FROM events WHERE message LIKE '%logged in%' OR message LIKE "
                        "'failed login%'")
    assert ("alice", "failed login as 'alice'") in logins and ("alice", "logged in") in logins
