"""The OHIF viewer, as a reading room would run it, in front of the test Orthanc.

OHIF ships as a built single-page application (npm package ``@ohif/app``, folder ``dist/``). It
is fetched once from the npm registry, checked against the registry's checksum and kept in
``.cache/``. A small HTTP server serves it on localhost with our own ``app-config.js`` and passes
``/dicom-web/`` through to Orthanc's DICOMweb plugin, so that the browser sees one origin (no
CORS) with the isolation headers OHIF needs for its shared-memory decoders.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tarfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from .peers import ROOT, Orthanc, free_port

OHIF_VERSION = "3.13.2"
OHIF_TARBALL = f"https://registry.npmjs.org/@ohif/app/-/app-{OHIF_VERSION}.tgz"
OHIF_SHA1 = "26a51ffcc1704c30fff403258a1d7392e9a991f3"  # the registry's "shasum" of that tarball
CACHE = ROOT / ".cache"

ISOLATION_HEADERS = {
    # OHIF decodes in workers that share memory (SharedArrayBuffer): only cross-origin isolated
    # pages get it.
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}

CONTENT_TYPES = {
    ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
    ".json": "application/json", ".wasm": "application/wasm", ".svg": "image/svg+xml",
    ".png": "image/png", ".woff2": "font/woff2", ".ico": "image/x-icon", ".map": "application/json",
}


def ohif_dist() -> Path:
    """The built viewer, downloaded and unpacked on first use."""
    target = CACHE / f"ohif-{OHIF_VERSION}"
    if (target / "index.html").exists():
        return target
    CACHE.mkdir(exist_ok=True)
    tarball = CACHE / f"ohif-app-{OHIF_VERSION}.tgz"
    if not tarball.exists() or hashlib.sha1(tarball.read_bytes()).hexdigest() != OHIF_SHA1:
        partial = tarball.with_suffix(".part")
        with urllib.request.urlopen(OHIF_TARBALL, timeout=300) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        digest = hashlib.sha1(partial.read_bytes()).hexdigest()
        if digest != OHIF_SHA1:
            raise RuntimeError(f"{OHIF_TARBALL}: sha1 {digest}, expected {OHIF_SHA1}")
        partial.rename(tarball)
    unpacking = target.with_suffix(".part")
    shutil.rmtree(unpacking, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
        archive.extractall(unpacking, members=members, filter="data")
    (unpacking / "package" / "dist").rename(target)
    shutil.rmtree(unpacking)
    return target


def app_config(viewer_url: str) -> str:
    """OHIF's configuration: one DICOMweb source, the Orthanc behind this server."""
    root = f"{viewer_url}/dicom-web"
    return f"""window.config = {{
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  investigationalUseDialog: {{ option: 'never' }},
  dataSources: [{{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {{
      friendlyName: 'test PACS (Orthanc)',
      name: 'orthanc',
      wadoUriRoot: '{root}',
      qidoRoot: '{root}',
      wadoRoot: '{root}',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
      bulkDataURI: {{ enabled: true }},
    }},
  }}],
}};
"""


class _ViewerHandler(BaseHTTPRequestHandler):
    server: _ViewerHTTPServer

    def log_message(self, format: str, *args) -> None:
        self.server.requests.append(format % args)

    def do_GET(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
        else:
            self._static()

    def _static(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            self._send(200, self.server.config_js.encode(), "text/javascript")
            return
        file = (self.server.dist / path.lstrip("/")).resolve()
        if not file.is_file() or self.server.dist not in file.parents:
            file = self.server.dist / "index.html"  # a route of the single-page application
        self._send(200, file.read_bytes(), CONTENT_TYPES.get(file.suffix, "application/octet-stream"))

    def _proxy(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.server.orthanc.http_port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
        connection.request("GET", self.path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        self._send(response.status, body, response.getheader("Content-Type", "application/octet-stream"))
        connection.close()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class _ViewerHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, dist: Path, orthanc: Orthanc) -> None:
        super().__init__(("127.0.0.1", port), _ViewerHandler)
        self.dist = dist.resolve()
        self.orthanc = orthanc
        self.config_js = app_config(f"http://127.0.0.1:{port}")
        self.requests: list[str] = []


class ViewerServer:
    """OHIF on ``url``, reading studies from ``orthanc`` over DICOMweb."""

    def __init__(self, orthanc: Orthanc) -> None:
        self._server = _ViewerHTTPServer(free_port(), ohif_dist(), orthanc)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def requests(self) -> list[str]:
        return self._server.requests

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# Headless Chromium has no GPU here: WebGL (which OHIF's cornerstone renders with) runs on
# SwiftShader, Chromium's software rasterizer, which has to be allowed explicitly.
CHROMIUM_FLAGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


@contextmanager
def browser_page(console_log: Path) -> Iterator[Page]:
    """A page in headless Chromium (Debian's); the page's console goes to ``console_log``."""
    executable = shutil.which("chromium")
    if executable is None:
        raise RuntimeError("chromium is not installed: run `make test`, which installs the system packages")
    lines: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda message: lines.append(f"{message.type}: {message.text}"))
            page.on("pageerror", lambda error: lines.append(f"page error: {error}"))
            yield page
        finally:
            console_log.write_text("\n".join(lines))
            browser.close()
