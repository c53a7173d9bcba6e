"""The HTTP application: health, metrics, API and dashboard in one FastAPI app.

The OpenAPI description is served at /api/openapi.json; the interactive documentation pages
FastAPI can add are left off, as they load their scripts from a CDN that a hospital network
does not reach.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from sqlalchemy import Engine
from starlette.middleware.sessions import SessionMiddleware

from dicom_node import __version__
from dicom_node.config import Config
from dicom_node.http import api, dashboard, stow
from dicom_node.http.health import NodeProcesses, readiness
from dicom_node.http.scrape import exposition, registry
from dicom_node.ingest.receiver import Receiver

SESSION_HOURS = 8


def session_key(data_dir: Path) -> str:
    """The key that signs dashboard sessions: made once, kept beside the database (mode 0600), so
    that sessions outlive a restart and no one has to configure it."""
    path = data_dir / "http-session.key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        key = secrets.token_hex(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(key)
        return key


def create_app(config: Config, engine: Engine, processes: NodeProcesses) -> FastAPI:
    @contextlib.asynccontextmanager
    async def receiving(app: FastAPI) -> AsyncIterator[None]:
        """STOW-RS stores through a receiver of its own, in this process (`http.stow`)."""
        app.state.stow_receiver = Receiver(config, engine)
        try:
            yield
        finally:
            app.state.stow_receiver.stop()

    app = FastAPI(title="dicom-node", version=__version__, openapi_url="/api/openapi.json", docs_url=None,
                  redoc_url=None, description="Studies, jobs, results and deliveries of a dicom-node, and the "
                  "operator's actions on them (docs/operations.md).", lifespan=receiving)
    app.state.config = config
    app.state.engine = engine
    app.state.processes = processes
    scraped = registry(config, engine, processes)
    app.add_middleware(SessionMiddleware, secret_key=session_key(config.node.data_dir), session_cookie="dicom_node",
                       max_age=SESSION_HOURS * 3600, same_site="strict", https_only=False)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/readyz", summary="200 when the node can take a study now; else 503 with the failing checks")
    def readyz() -> JSONResponse:
        checks = readiness(config, engine, processes)
        ready = all(check.ok for check in checks.values())
        body = {"ready": ready, "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()}}
        if not ready:
            body["failing"] = [name for name, check in checks.items() if not check.ok]
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        if config.http.login_required:
            api.requiring("viewer")(request)
        return Response(exposition(scraped), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(dashboard.LoginNeeded)
    def to_login(_request: Request, needed: dashboard.LoginNeeded) -> RedirectResponse:
        return RedirectResponse(f"/login?next={needed.back}", status_code=303)

    app.include_router(api.router)
    app.include_router(stow.router)
    app.include_router(dashboard.router)
    return app
