"""STOW-RS in (PS3.18 10.5): `POST /dicom-web/studies` and `POST /dicom-web/studies/{study}` on
the node's HTTP server, with the promise a C-STORE has.

Each instance of the request goes through the receiver's own path (`ingest.receiver`): the same
checks (structure, UIDs, size, the disk's watermark), the same durable write and index, and an
instance is reported stored only once it is, exactly as a C-STORE's Success. What is refused
is reported in the Failed SOP Sequence with the status a C-STORE would have had (0xA700 Out of
Resources, 0xC000 Cannot Understand, 0xA900 Data Set Does Not Match SOP Class, which is also
the answer for an instance of another study than the one a study-level request names), and the
log names it. A request carries at most ``max_instance_mb``, read before anything is stored, so a
request costs at most that much memory. Callers authenticate as for the API, with the operator
role (a PACS or a gateway is given an API token).
"""

from __future__ import annotations

import io
import json
import struct
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydicom import dcmread

from dicom_node.http.auth import Account, requiring
from dicom_node.ingest.acceptor import StoreRequest
from dicom_node.ingest.receiver import Receiver
from dicom_node.state.files import is_valid_uid

router = APIRouter(prefix="/dicom-web")
Sender = Annotated[Account, Depends(requiring("operator"))]
CANNOT_UNDERSTAND, OUT_OF_RESOURCES = 0xC000, 0xA700
PREAMBLE_AND_PREFIX = 132
CALLING_AE = "STOW-RS"  # how metrics and logs name what came in over HTTP


def _boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` body."""
    kind, _, parameters = content_type.partition(";")
    values = {}
    for parameter in parameters.split(";"):
        name, _, value = parameter.strip().partition("=")
        values[name.lower()] = value.strip().strip('"')
    if kind.strip().lower() != "multipart/related" or not values.get("boundary"):
        raise HTTPException(415, "STOW-RS takes multipart/related; type=\"application/dicom\" with a boundary")
    if values.get("type", "application/dicom").lower() != "application/dicom":
        raise HTTPException(415, f"parts of type {values['type']!r}: only application/dicom is stored")
    return values["boundary"].encode()


def parts(body: bytes, boundary: bytes) -> list[bytes]:
    """The contents of a multipart body's parts, their headers left off."""
    delimiter = b"--" + boundary
    found = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        _, separator, content = chunk.partition(b"\r\n\r\n")
        if separator:
            found.append(content.removesuffix(b"\r\n"))
    return found


def _store(receiver: Receiver, part: bytes, address: str, study_uid: str) -> tuple[str, str, int]:
    """(SOP class, SOP instance, status) of one Part 10 file, stored as a C-STORE would be if it
    belongs to ``study_uid`` (any study for "")."""
    if len(part) < PREAMBLE_AND_PREFIX + 12 or part[128:132] != b"DICM":
        return "", "", CANNOT_UNDERSTAND
    try:
        (group_length,) = struct.unpack_from("<I", part, PREAMBLE_AND_PREFIX + 8)
        meta_end = PREAMBLE_AND_PREFIX + 12 + group_length
        meta = dcmread(io.BytesIO(part[:meta_end])).file_meta  # the file meta alone: never the pixels
        sop_class, sop_instance = str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)
        syntax = str(meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - any unreadable meta is the sender's malformed file
        return "", "", CANNOT_UNDERSTAND
    request = StoreRequest(CALLING_AE, address, sop_class, sop_instance, syntax, study_uid=study_uid)
    return sop_class, sop_instance, receiver.store(request, part[meta_end:])


def _answer(results: list[tuple[str, str, int]]) -> dict:
    def item(sop_class: str, sop_instance: str) -> dict:
        return {"00081150": {"vr": "UI", "Value": [sop_class]}, "00081155": {"vr": "UI", "Value": [sop_instance]}}

    answer = {}
    stored = [item(c, i) for c, i, status in results if status == 0]
    failed = [{**item(c, i), "00081197": {"vr": "US", "Value": [status]}} for c, i, status in results if status]
    if stored:
        answer["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": failed}
    return answer


@router.post("/studies", summary="STOW-RS: store instances, answered once each is stored durably")
async def store_instances(request: Request, _: Sender) -> Response:
    return await _store_request(request, "")


@router.post("/studies/{study}", summary="STOW-RS: store instances of one study; those of another are refused")
async def store_study_instances(study: str, request: Request, _: Sender) -> Response:
    if not is_valid_uid(study):
        raise HTTPException(400, "the study in the path is not a valid UID")
    return await _store_request(request, study)


async def _store_request(request: Request, study_uid: str) -> Response:
    """Read the whole body (bounded), store each part, and answer with what was stored and
    what was refused: 200 all, 202 some, 409 none."""
    config = request.app.state.config
    limit = int(config.node.max_instance_mb * 1024 * 1024)
    boundary = _boundary(request.headers.get("content-type", ""))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"a STOW-RS request carries at most max_instance_mb = "
                                     f"{config.node.max_instance_mb:g} MB")
    address = request.client.host if request.client else "unknown"
    receiver = request.app.state.stow_receiver
    results = await run_in_threadpool(lambda: [_store(receiver, part, address, study_uid)
                                                      for part in parts(bytes(body), boundary)])
    if not results:
        raise HTTPException(400, "the request holds no part")
    failures = sum(1 for _, _, status in results if status)
    status = 200 if not failures else (409 if failures == len(results) else 202)
    return Response(json.dumps(_answer(results)), status_code=status, media_type="application/dicom+json")
