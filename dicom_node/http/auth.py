"""Who is asking, and may they: the HTTP surface's authentication and roles.

Without configuration the server listens on 127.0.0.1 only and is open: whoever can reach it
is on the machine and is admin. Listening elsewhere (or ``require_login``) asks every request
for one of: an API token (``Authorization: Bearer``), a user's password (``Authorization:
Basic``, for scripts), or the dashboard's session cookie, set by the login form.

Forms change state, so they are protected against cross-site requests whatever the mode: a
page of another site must not retry jobs through a browser open on the node, even on
127.0.0.1. A request authenticated by a cookie (or by nothing, in the open mode) must carry
the session's CSRF token; a request with an Authorization header needs none, since a browser
never adds one on its own.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from collections.abc import Callable

from fastapi import HTTPException, Request
from sqlalchemy import Engine
from starlette.datastructures import FormData

from dicom_node.state import accounts
from dicom_node.state.accounts import Account
from dicom_node.state.audit import Operator

OPEN_ACCOUNT = Account("anonymous (open on loopback)", "admin")
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class LoginRequired(HTTPException):
    def __init__(self) -> None:
        super().__init__(401, "authentication required: an API token, a user's password, or the dashboard's login",
                         headers={"WWW-Authenticate": 'Bearer realm="dicom-node", Basic realm="dicom-node"'})


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use."""
    token = request.session.get("csrf")
    if token is None:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def authenticate(request: Request, engine: Engine, login_required: bool) -> Account | None:
    """The caller's account, or None when nobody is logged in and login is required."""
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return accounts.check_token(engine, credentials.strip())
    if scheme.lower() == "basic" and credentials:
        try:
            name, _, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return accounts.check_password(engine, name, password)
    if not login_required:
        return OPEN_ACCOUNT
    name = request.session.get("user")
    return accounts.user(engine, name) if isinstance(name, str) else None


def check_csrf(request: Request, submitted: str | None) -> None:
    """Refuse a state change that came with a cookie (or nothing) and without the session's token."""
    if request.headers.get("authorization"):
        return
    expected = request.session.get("csrf")
    if not expected or not submitted or not hmac.compare_digest(expected, submitted):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


async def checked_form(request: Request, max_files: int = 0, header_too: bool = False) -> FormData:
    """The posted form, once its CSRF token (the form's field, or with ``header_too`` the
    X-CSRF-Token header) is the session's; at most 10 fields and ``max_files`` files."""
    form = await request.form(max_files=max_files, max_fields=10)
    submitted = form.get(CSRF_FIELD)
    if not isinstance(submitted, str):
        submitted = request.headers.get(CSRF_HEADER) if header_too else None
    check_csrf(request, submitted)
    return form


def operator_of(request: Request, account: Account) -> Operator:
    """The audit trail's name for the caller of this request."""
    address = request.client.host if request.client else "unknown"
    return Operator(account.name, address)


def requiring(role: str) -> Callable[[Request], Account]:
    """A FastAPI dependency: the caller's account, 401 if unknown, 403 below ``role``."""

    def dependency(request: Request) -> Account:
        state = request.app.state
        account = authenticate(request, state.engine, state.config.http.login_required)
        if account is None:
            raise LoginRequired()
        if not account.may(role):
            raise HTTPException(403, f"{account.name} is {account.role}: this needs the {role} role")
        return account

    return dependency
