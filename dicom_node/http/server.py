"""The HTTP server, run by a thread of `serve`'s main process with uvicorn.

The socket is bound by `bind` before the node starts its children, so that a port already in
use stops the node at start with a clear message, as a taken DICOM port does. Uvicorn bounds
what a client can hold: concurrent connections (`MAX_CONNECTIONS`, then 503), idle keep-alive
time, and the size of request headers; the rule tester bounds its uploads itself.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from sqlalchemy import Engine

from dicom_node.config import Config
from dicom_node.http.app import create_app
from dicom_node.http.health import NodeProcesses

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
KEEP_ALIVE_SECONDS = 5
START_SECONDS = 30.0


def bind(config: Config) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.http.host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind((config.http.host, config.http.port))
    listening.listen(128)
    listening.set_inheritable(False)
    return listening


class HttpServer:
    def __init__(self, config: Config, engine: Engine, processes: NodeProcesses, listening: socket.socket) -> None:
        app = create_app(config, engine, processes)
        self.listening = listening
        self.server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", limit_concurrency=MAX_CONNECTIONS,
            timeout_keep_alive=KEEP_ALIVE_SECONDS, server_header=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listening]}, name="http",
                                       daemon=True)
        self.address = f"http://{config.http.host}:{config.http.port}"

    def start(self) -> bool:
        self.thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                log.error("the HTTP server did not start on %s; see above", self.address)
                return False
            time.sleep(0.05)
        log.info("dashboard, API and metrics on %s", self.address)
        return True

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.listening.close()
