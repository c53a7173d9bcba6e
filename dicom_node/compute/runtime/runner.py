"""The process inside a bundle's runtime: loads the bundle once, then runs volume after volume.

The worker starts it (`client`) with the runtime's Python and talks to it over stdin and stdout
(`wire`): ``load`` once, then ``predict`` per job, each answered with ``ok`` and the result, or
with the problem in words, diagnosed here where the runtime's own MONAI and NumPy are known.
What the bundle's code prints goes to stderr with the runner's log, which the worker logs; the
protocol has the original stdout to itself. The runner ends when the worker closes its stdin or
dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from dicom_node.compute.bundle import Bundle, choose_device
from dicom_node.compute.bundle_diagnosis import RUNTIME, diagnose, installed, made_with
from dicom_node.compute.job_memory import give_back_freed_memory, reuse_freed_memory
from dicom_node.compute.runtime.wire import WireError, receive, send

log = logging.getLogger("dicom_node.runtime")

_PR_SET_PDEATHSIG = 1


def _die_with_the_worker() -> None:
    """A worker killed outright cannot stop its runner: the kernel does, on Linux."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the worker died before the line above
        sys.exit(0)


class _OneLine(logging.Formatter):
    """A record on one line, its newlines written as ``\\n``: the worker reads the runner's log
    line by line, and a traceback is then one record there too (`client`)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\\", "\\\\").replace("\n", "\\n")


def _answer_failure(replies: BinaryIO, error: BaseException, bundle_dir: str | None) -> None:
    log.error("%s", "".join(traceback.format_exception(error)).rstrip())
    memory = isinstance(error, (MemoryError, torch.OutOfMemoryError))
    problem = diagnose(error, made_with(Path(bundle_dir)) if bundle_dir else {}, RUNTIME)
    send(replies, {"ok": False, "problem": problem, "memory": memory})


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    bundle: Bundle | None = None
    bundle_dir: str | None = None
    while True:
        try:
            header, array = receive(requests)
        except WireError:
            return
        try:
            if header["op"] == "load":
                bundle_dir = header["bundle_dir"]
                bundle = Bundle(Path(bundle_dir), choose_device(header["device"]))
                send(replies, {"ok": True, "device": str(bundle.device), "weight_mb": bundle.weight_mb,
                               "versions": {name: installed(name) for name in ("monai", "torch", "numpy")}})
            elif header["op"] == "predict" and bundle is not None and array is not None:
                labels = bundle.predict_array(array, np.asarray(header["affine_ras"], dtype=np.float64),
                                              header["name"])
                send(replies, {"ok": True, "timings": bundle.timings}, labels)
                del array, labels
                give_back_freed_memory()  # as the worker does between jobs: an idle runner holds its model only
            else:
                send(replies, {"ok": False, "problem": f"the runner cannot {header.get('op')!r} now", "memory": False})
        except Exception as error:  # noqa: BLE001 - the worker hears every failure; the runner goes on
            _answer_failure(replies, error, bundle_dir)


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints from the bundle's code go to the log
    _die_with_the_worker()
    reuse_freed_memory()  # the worker's allocation policy for volume-sized blocks (`job_memory`)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine("%(levelno)d %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
