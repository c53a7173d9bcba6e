"""STOW-RS (PS3.18 10.5): results sent to a DICOMweb destination, one instance a request.

One request per instance gives each delivery its own outcome, as a C-STORE gives each its
status: a 409 or a Failed SOP Sequence in the answer names that instance alone. What the answer
says maps onto the dispatcher's outcomes (`dispatch.Outcome`): stored; refused for good (the
server will never take it: 400, 409, 413, 415, or a failure reason in the answer), which
dead-letters the delivery; anything else (unreachable, 5xx, 401, 403, 404, 408, 429: what an
operator or time can fix) is tried again with backoff.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from dicom_node import tls
from dicom_node.config import Destination

TIMEOUT_SECONDS = 60.0
PERMANENT_STATUSES = {400, 409, 413, 415}
FAILED_SOP_SEQUENCE, FAILURE_REASON = "00081198", "00081197"
ANSWER_BYTES = 1024 * 1024  # of a server's answer, at most, read


def request_headers(destination: Destination, boundary: str) -> dict[str, str]:
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json", "User-Agent": "dicom-node"}
    if destination.token:
        headers["Authorization"] = f"Bearer {destination.token}"
    elif destination.username is not None:
        pair = f"{destination.username}:{destination.password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    return headers


def _context(destination: Destination) -> ssl.SSLContext | None:
    return tls.client_context(destination) if destination.url.startswith("https://") else None


def store(destination: Destination, path: str) -> tuple[str | None, bool]:
    """POST one file to ``url``/studies: (None, False) once stored, else (what went wrong,
    whether for good)."""
    content = Path(path).read_bytes()
    boundary = secrets.token_hex(16)
    body = b"".join([f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), content,
                     f"\r\n--{boundary}--\r\n".encode()])
    request = urllib.request.Request(destination.url.rstrip("/") + "/studies", data=body, method="POST",
                                     headers=request_headers(destination, boundary))
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS, context=_context(destination)) as answer:
            reply = answer.read(ANSWER_BYTES)
    except urllib.error.HTTPError as error:
        problem = f"STOW-RS answered HTTP {error.code} {error.reason}{_failure(error.read(ANSWER_BYTES))}"
        return problem, error.code in PERMANENT_STATUSES
    except (urllib.error.URLError, OSError, ValueError) as error:
        return f"STOW-RS to {destination.url} failed: {getattr(error, 'reason', error)}", False
    failure = _failure(reply)
    return (f"STOW-RS refused the instance{failure}", True) if failure else (None, False)


def _failure(reply: bytes) -> str:
    """The Failed SOP Sequence's reason in a STOW-RS answer, as ": failure reason 0xA700", or ""."""
    try:
        answer = json.loads(reply)
    except ValueError:
        return ""
    answer = answer[0] if isinstance(answer, list) and answer else answer
    failed = answer.get(FAILED_SOP_SEQUENCE, {}).get("Value") if isinstance(answer, dict) else None
    if not failed:
        return ""
    reasons = failed[0].get(FAILURE_REASON, {}).get("Value", [])
    return f": failure reason 0x{int(reasons[0]):04X}" if reasons else ": the instance is in the Failed SOP Sequence"
