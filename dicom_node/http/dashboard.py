"""The dashboard: HTML rendered on the server from Jinja2 templates, forms for the actions, SVG
charts, and a page that reloads itself for the live queue. No JavaScript, so no build step.

The pages read what the API reads (`state.overview`); the forms call the same actions, with
the session's CSRF token, and come back to the page they were sent from.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import UploadFile

from dicom_node.http.api import DAY, MAX_RULE_TEST_FILES, public_config, tested_rules
from dicom_node.http.auth import authenticate, checked_form, csrf_token, operator_of
from dicom_node.http.charts import line, stacked_bars
from dicom_node.state import accounts, actions, db, jobs, overview
from dicom_node.state.accounts import Account

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
QUEUE_REFRESH_SECONDS = 2


def _when(at: float | None) -> str:
    return "" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


templates.env.filters["when"] = _when


class LoginNeeded(Exception):
    """Raised by a page whose visitor must log in first; the app answers with a redirect."""

    def __init__(self, back: str) -> None:
        self.back = back


def _account(request: Request, role: str) -> Account:
    state = request.app.state
    account = authenticate(request, state.engine, state.config.http.login_required)
    if account is None:
        raise LoginNeeded(request.url.path)
    if not account.may(role):
        raise HTTPException(403, f"{account.name} is {account.role}: this needs the {role} role")
    return account


def _page(request: Request, template: str, account: Account | None, title: str, **context) -> HTMLResponse:
    state = request.app.state
    message = request.query_params.get("message")
    return templates.TemplateResponse(request, template, {
        "title": title, "account": account, "csrf": csrf_token(request), "ae_title": state.config.node.ae_title,
        "login_required": state.config.http.login_required, "message": message,
        "error": request.query_params.get("error") == "1", "refresh": None,
        "can_operate": account is not None and account.may("operator"), **context})


@router.get("/", response_class=HTMLResponse)
def overview_page(request: Request) -> HTMLResponse:
    account = _account(request, "viewer")
    state = request.app.state
    now = db.now()
    activity = overview.pipeline_activity(state.engine, state.config, now - DAY, now)
    charts = []
    for pipeline in activity:
        hours = pipeline["hours"]
        charts.append(stacked_bars(f"{pipeline['pipeline']}: jobs per hour",
                                   [(_hour(h["start"]), h["done"], h["failed"]) for h in hours]))
        charts.append(line(f"{pipeline['pipeline']}: median latency per hour",
                           [(_hour(h["start"]), h["latency_p50_s"]) for h in hours], "s"))
    return _page(request, "index.html", account, "Overview", refresh=QUEUE_REFRESH_SECONDS,
                 queue=overview.queue(state.engine), failures=overview.failures(state.engine),
                 recent=overview.list_studies(state.engine, overview.StudyFilter(), 0, 20).studies,
                 pipelines=activity, charts=charts,
                 destinations=overview.destination_health(state.engine, state.config))


def _hour(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%H:00")


@router.get("/studies", response_class=HTMLResponse)
def studies_page(request: Request, state: str | None = None, patient_id: str | None = None,
                 offset: int = 0, limit: int = 50) -> HTMLResponse:
    account = _account(request, "viewer")
    offset, limit = max(0, offset), min(max(1, limit), 500)
    where = overview.StudyFilter(state or None, patient_id or None)
    page = overview.list_studies(request.app.state.engine, where, offset, limit)

    def query(at: int) -> str:
        return urlencode({k: v for k, v in (("state", state), ("patient_id", patient_id), ("offset", at),
                                            ("limit", limit)) if v not in (None, "")})

    return _page(request, "studies.html", account, "Studies", page=page, where=where, offset=offset, limit=limit,
                 states=overview.STUDY_STATES, query=query)


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(request: Request, study_uid: str) -> HTMLResponse:
    account = _account(request, "viewer")
    detail = overview.study_detail(request.app.state.engine, study_uid)
    if detail is None:
        raise HTTPException(404, f"no study received with the Study Instance UID {study_uid}")
    start = detail["first_received_at"]
    timeline = [{"at": start, "offset": 0.0, "actor": "node", "address": "", "level": "info",
                 "message": "first instance received"}]
    timeline += [event | {"offset": event["at"] - start} for event in detail["events"]]
    timeline.append({"at": detail["last_received_at"], "offset": detail["last_received_at"] - start, "actor": "node",
                     "address": "", "level": "info", "message": "last instance received"})
    timeline.sort(key=lambda entry: entry["at"])
    return _page(request, "study.html", account, f"Study {study_uid}", study=detail, timeline=timeline,
                 refresh=QUEUE_REFRESH_SECONDS if detail["status"] not in ("done", "failed") else None)


@router.get("/rules", response_class=HTMLResponse)
def rules_page(request: Request) -> HTMLResponse:
    return _page(request, "rules.html", _account(request, "viewer"), "Rule tester", answer=None)


@router.post("/rules", response_class=HTMLResponse)
async def rules_test(request: Request) -> HTMLResponse:
    account = _account(request, "viewer")
    form = await checked_form(request, MAX_RULE_TEST_FILES)
    uploads = [item for item in form.getlist("files") if isinstance(item, UploadFile)]
    answer = tested_rules(request.app.state.config, request.app.state.engine, uploads) if uploads else None
    return _page(request, "rules.html", account, "Rule tester", answer=answer)


@router.get("/config", response_class=HTMLResponse)
def config_page(request: Request) -> HTMLResponse:
    account = _account(request, "admin")
    text = json.dumps(public_config(request.app.state.config), indent=2)
    return _page(request, "config.html", account, "Configuration", config_text=text)


def _back(next_page: str | None, fallback: str = "/") -> str:
    """Only a path of this server: a form must not send the browser elsewhere."""
    if next_page and next_page.startswith("/") and not next_page.startswith("//"):
        return next_page
    return fallback


async def _form_action(request: Request, action, *args) -> Response:
    account = _account(request, "operator")
    form = await checked_form(request)
    back = _back(form.get("next") if isinstance(form.get("next"), str) else None)
    try:
        message = action(request.app.state.engine, *args, operator_of(request, account))
        failed = False
    except actions.ActionRefused as error:
        message, failed = str(error), True
    separator = "&" if "?" in back else "?"
    query = urlencode({"message": message, **({"error": "1"} if failed else {})})
    return RedirectResponse(f"{back}{separator}{query}", status_code=303)


@router.post("/actions/jobs/{job_id}/{action}")
async def job_form(request: Request, job_id: int, action: str) -> Response:
    chosen = {"retry": actions.retry_job, "rerun": actions.rerun_job, "cancel": actions.cancel_job}.get(action)
    if chosen is None:
        raise HTTPException(404, f"no job action {action!r}")

    def run(engine, job, by) -> str:
        chosen(engine, job, by)
        return f"job {job}: {action} done"

    return await _form_action(request, run, job_id)


@router.post("/actions/studies/{study_uid}/{action}")
async def study_form(request: Request, study_uid: str, action: str) -> Response:
    if not overview.study_exists(request.app.state.engine, study_uid):
        raise HTTPException(404, f"no study received with the Study Instance UID {study_uid}")
    if action == "retry":
        def run(engine, uid, by) -> str:
            retried = jobs.requeue_failed(engine, [uid], by)
            return f"{retried.jobs} job(s) re-queued, {retried.dead_letters} dead delivery(ies) pending again"
    elif action == "rerun":
        def run(engine, uid, by) -> str:
            return f"{jobs.rerun(engine, [uid], by)} job(s) queued to run again"
    else:
        raise HTTPException(404, f"no study action {action!r}")
    return await _form_action(request, run, study_uid)


@router.post("/actions/results/{result_id}/resend")
async def resend_form(request: Request, result_id: int) -> Response:
    def run(engine, result, by) -> str:
        return f"{actions.resend_result(engine, result, by)} delivery(ies) of result {result} pending again"

    return await _form_action(request, run, result_id)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/") -> HTMLResponse:
    return _page(request, "login.html", None, "Log in", next=_back(next))


@router.post("/login")
async def login(request: Request) -> Response:
    form = await checked_form(request)
    name, password = form.get("username"), form.get("password")
    back = _back(form.get("next") if isinstance(form.get("next"), str) else None)
    account = (accounts.check_password(request.app.state.engine, name, password)
               if isinstance(name, str) and isinstance(password, str) else None)
    address = request.client.host if request.client else "unknown"
    with request.app.state.engine.begin() as connection:
        db.log_event(connection, None, "info" if account else "warning",
                     "logged in" if account else f"failed login as {name!r}", name if isinstance(name, str) else None,
                     address)
    if account is None:
        return RedirectResponse("/login?" + urlencode({"next": back, "message": "wrong user or password",
                                                       "error": "1"}), status_code=303)
    request.session.clear()  # a new session at login: a session fixed before it is worth nothing
    request.session["user"] = account.name
    csrf_token(request)
    return RedirectResponse(back, status_code=303)


@router.post("/logout")
async def logout(request: Request) -> Response:
    await checked_form(request)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)
