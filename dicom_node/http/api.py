"""The REST API under /api/: JSON, described by the OpenAPI document at /api/openapi.json.

Reading needs the viewer role, actions (retry, rerun, cancel, re-send) the operator role, the
configuration the admin role. Every action is recorded in the audit trail with the caller's
name and address. Values that came from the network are returned as they are stored: JSON
escapes them, and the dashboard's templates escape them for HTML.
"""

from __future__ import annotations

import re
import tempfile
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydicom.errors import InvalidDicomError
from starlette.datastructures import UploadFile

from dicom_node.config import Config
from dicom_node.http.auth import CSRF_HEADER, check_csrf, checked_form, operator_of, requiring
from dicom_node.state import actions, audit, db, jobs, overview, pipeline_checks
from dicom_node.state.accounts import Account
from dicom_node.state.completion import explain, explain_stacks
from dicom_node.state.rules import series_stacks

router = APIRouter(prefix="/api")
Viewer = Annotated[Account, Depends(requiring("viewer"))]
Operator = Annotated[Account, Depends(requiring("operator"))]
Admin = Annotated[Account, Depends(requiring("admin"))]

DAY = 86_400.0
MAX_RULE_TEST_FILES = 2000
MAX_RULE_TEST_BYTES = 512 * 1024 * 1024
SECRET_KEYS = ("secret", "password", "token", "key")


def _state(request: Request):
    return request.app.state


def _known_study(request: Request, study_uid: str) -> None:
    if not overview.study_exists(_state(request).engine, study_uid):
        raise HTTPException(404, f"no study received with the Study Instance UID {study_uid}")


def _date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as error:
        raise HTTPException(422, f"not an ISO 8601 date or time: {value!r}") from error
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


@router.get("/studies", summary="Studies, newest first, with their state as `status` derives it")
def list_studies(
    request: Request, _: Viewer,
    state: Literal["receiving", "queued", "running", "sending", "done", "failed"] | None = None,
    patient_id: str | None = None,
    received_from: Annotated[str | None, Query(description="ISO 8601; first instance at or after")] = None,
    received_to: Annotated[str | None, Query(description="ISO 8601; first instance at or before")] = None,
    study_date_from: Annotated[str | None, Query(pattern=r"^\d{8}$", description="YYYYMMDD; Study Date at or after")] = None,
    study_date_to: Annotated[str | None, Query(pattern=r"^\d{8}$", description="YYYYMMDD; Study Date at or before")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict:
    page = overview.list_studies(_state(request).engine, overview.StudyFilter(
        state, patient_id, _date(received_from), _date(received_to), study_date_from, study_date_to), offset, limit)
    return {"total": page.total, "offset": offset, "limit": limit, "studies": page.studies}


@router.get("/studies/{study_uid}", summary="One study: series, jobs, results, deliveries and events")
def get_study(request: Request, study_uid: str, _: Viewer) -> dict:
    detail = overview.study_detail(_state(request).engine, study_uid)
    if detail is None:
        raise HTTPException(404, f"no study received with the Study Instance UID {study_uid}")
    return detail


@router.get("/studies/{study_uid}/explain", summary="Series by series, why each pipeline takes it or not")
def explain_study(request: Request, study_uid: str, _: Viewer) -> dict:
    _known_study(request, study_uid)
    text = explain(_state(request).config, _state(request).engine, study_uid)
    return {"study_uid": study_uid, "text": text}


@router.get("/studies/{study_uid}/audit", summary="The study's audit trail, as JSON or CSV")
def study_audit(request: Request, study_uid: str, _: Viewer, format: Literal["json", "csv"] = "json") -> Response:
    _known_study(request, study_uid)
    return _audit_response(audit.trail(_state(request).engine, study_uid), format, f"audit-{study_uid}")


@router.get("/audit", summary="The node's audit trail: every state change and operator action")
def node_audit(request: Request, _: Viewer, format: Literal["json", "csv"] = "json",
               after_id: Annotated[int, Query(ge=0)] = 0,
               limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000) -> Response:
    return _audit_response(audit.trail(_state(request).engine, None, limit, after_id), format, "audit")


def _audit_response(rows: list[dict], format: str, name: str) -> Response:
    if format == "csv":
        return Response(audit.as_csv(rows), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{_safe_name(name)}.csv"'})
    return Response(audit.as_json(rows), media_type="application/json")


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)[:100]


def _act(request: Request, account: Account, action, *args):
    """Run an operator's action; a call without an Authorization header (a browser's) must carry
    the session's CSRF token in X-CSRF-Token."""
    check_csrf(request, request.headers.get(CSRF_HEADER))
    try:
        return action(_state(request).engine, *args, operator_of(request, account))
    except actions.NotFound as error:
        raise HTTPException(404, str(error)) from error
    except actions.ActionRefused as error:
        raise HTTPException(409, str(error)) from error


@router.post("/studies/{study_uid}/retry", summary="Re-queue the study's failed jobs and dead deliveries")
def retry_study(request: Request, study_uid: str, account: Operator) -> dict:
    _known_study(request, study_uid)
    retried = _act(request, account, lambda engine, uid, by: jobs.requeue_failed(engine, [uid], by),
                   study_uid)
    return {"jobs": retried.jobs, "studies": retried.studies, "dead_letters": retried.dead_letters}


@router.post("/studies/{study_uid}/rerun", summary="Run the study's finished jobs again")
def rerun_study(request: Request, study_uid: str, account: Operator) -> dict:
    _known_study(request, study_uid)
    return {"jobs": _act(request, account, lambda engine, uid, by: jobs.rerun(engine, [uid], by),
                         study_uid)}


@router.post("/jobs/{job_id}/{action}", summary="retry (a failed job), rerun (a finished one) or cancel")
def job_action(request: Request, job_id: int, action: Literal["retry", "rerun", "cancel"], account: Operator,
               ) -> dict:
    chosen = {"retry": actions.retry_job, "rerun": actions.rerun_job, "cancel": actions.cancel_job}[action]
    _act(request, account, chosen, job_id)
    return {"job": job_id, "action": action, "done": True}


@router.post("/results/{result_id}/resend", summary="Send a result again to each of its destinations")
def resend(request: Request, result_id: int, account: Operator) -> dict:
    return {"result": result_id, "deliveries": _act(request, account, actions.resend_result, result_id)}


@router.get("/queue", summary="The live queue: receiving, queued, running, sending")
def live_queue(request: Request, _: Viewer) -> dict:
    return overview.queue(_state(request).engine)


@router.get("/failures", summary="Failed jobs, failed studies and dead deliveries, with their reasons")
def failures(request: Request, _: Viewer) -> list[dict]:
    return overview.failures(_state(request).engine)


@router.get("/pipelines", summary="Each pipeline with its counts, latency and failure rate over the last day")
def pipelines(request: Request, _: Viewer) -> list[dict]:
    now = db.now()
    return overview.pipeline_activity(_state(request).engine, _state(request).config, now - DAY, now)


@router.get("/destinations", summary="Each destination with its deliveries by state and its last error")
def destinations(request: Request, _: Viewer) -> list[dict]:
    return overview.destination_health(_state(request).engine, _state(request).config)


@router.get("/config", summary="The running configuration, secrets hidden")
def configuration(request: Request, _: Admin) -> dict:
    return public_config(_state(request).config)


def public_config(config: Config) -> dict:
    """The configuration as JSON, every value whose key names a secret replaced by ``"***"``,
    and the password of a database URL too."""

    def hide(value):
        if isinstance(value, dict):
            return {key: "***" if any(word in key for word in SECRET_KEYS) and item else hide(item)
                    for key, item in value.items()}
        if isinstance(value, list):
            return [hide(item) for item in value]
        return value

    shown = hide(config.model_dump(mode="json", by_alias=True))
    if shown["database"]["url"]:
        shown["database"]["url"] = re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", shown["database"]["url"])
    return shown


@router.post("/rule-test", summary="Which pipelines would take the series of the uploaded DICOM files, and why")
async def rule_test(request: Request, _: Viewer) -> dict:
    """The answer is `dicom-node explain`'s, made from the uploaded files instead of a stored
    study. Nothing uploaded is kept."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit() or int(length) > MAX_RULE_TEST_BYTES:
        raise HTTPException(413, f"a rule test uploads at most {MAX_RULE_TEST_BYTES // 2**20} MB, with a Content-Length")
    form = await checked_form(request, MAX_RULE_TEST_FILES, header_too=True)
    uploads = [item for item in form.getlist("files") if isinstance(item, UploadFile)]
    if not uploads:
        raise HTTPException(422, "upload one or more DICOM files as the form field 'files'")
    return tested_rules(_state(request).config, _state(request).engine, uploads)


def tested_rules(config: Config, engine, uploads: list[UploadFile]) -> dict:
    with db.reading(engine) as connection:
        disabled = pipeline_checks.disabled(connection)
    with tempfile.TemporaryDirectory(prefix="rule-test-") as folder:
        by_series: dict[str, list[Path]] = defaultdict(list)
        refused = []
        for index, upload in enumerate(uploads):
            path = Path(folder) / f"{index:05d}.dcm"
            with open(path, "wb") as out:
                while chunk := upload.file.read(1 << 20):
                    out.write(chunk)
            try:
                series_uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                                 .SeriesInstanceUID)
            except (InvalidDicomError, AttributeError, OSError, ValueError) as error:
                refused.append({"file": upload.filename, "reason": f"not a DICOM file with a Series Instance UID: {error}"})
                continue
            by_series[series_uid].append(path)
        stacks = [stack for uid, paths in sorted(by_series.items()) for stack in series_stacks(uid, sorted(paths))]
        lines = explain_stacks(config, stacks, disabled) if stacks else []
    return {"text": "\n".join(lines), "series": sorted(by_series), "refused": refused}
