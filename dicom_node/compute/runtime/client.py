"""A bundle loaded in its runtime, seen from the worker as if it were loaded in the worker.

`RuntimeBundle` starts the runtime's runner (`runner`), has it load the bundle, and sends it
each job's volume; it answers like `dicom_node.compute.bundle.Bundle` (``info``, ``weight_mb``,
``timings``, ``predict``), so the worker runs either the same way. The runner is started with
the runtime's Python in isolated mode, and the node's package is imported there from its own
directory only: nothing else of the node's environment (its MONAI, its NumPy) can be seen.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

import dicom_node
from dicom_node.bundle_info import read_bundle_info
from dicom_node.compute.bundle import DiagnosedError
from dicom_node.compute.runtime.prepare import python_of
from dicom_node.compute.runtime.wire import WireError, receive, send, widen

if TYPE_CHECKING:
    from dicom_node.compute.volume import Volume

log = logging.getLogger("dicom_node.runtime")

# Run by the runtime's Python: `dicom_node` from the node's package directory, and nothing more.
BOOTSTRAP = """
import importlib.util, sys
package = sys.argv[1]
spec = importlib.util.spec_from_file_location(
    "dicom_node", package + "/__init__.py", submodule_search_locations=[package])
module = importlib.util.module_from_spec(spec)
sys.modules["dicom_node"] = module
spec.loader.exec_module(module)
from dicom_node.compute.runtime.runner import main
main()
"""
LOG_LINE_BYTES = 8192  # a line of the runner's log, cut beyond this
LAST_WORDS = 12  # lines of the runner's log kept to say why it ended
_LEVELLED = re.compile(r"(\d{1,2}) ([\w.]+): (.*)", re.DOTALL)


def _multiline(text: str) -> str:
    """A record of the runner's log with its newlines back (`runner._OneLine`)."""
    return re.sub(r"\\(.)", lambda escaped: "\n" if escaped.group(1) == "n" else escaped.group(1), text)


class RuntimeExited(RuntimeError):
    """The runner ended while the worker waited for it (killed for memory, crashed); a retry
    starts a new one."""


class RuntimeBundle:
    """One bundle, loaded and kept by a runner in its runtime, ready for many volumes."""

    def __init__(self, bundle_dir: Path, device: str, runtime: Path) -> None:
        self.bundle_dir = bundle_dir
        self.device_setting = device
        self.runtime = runtime
        self.info = read_bundle_info(bundle_dir)
        self.timings: dict[str, float] = {}
        self.weight_mb = 0.0
        self.versions: dict[str, str] = {}
        self._process: subprocess.Popen | None = None
        self._last_words: deque[str] = deque(maxlen=LAST_WORDS)
        self._start()

    def _start(self) -> None:
        started = time.perf_counter()
        package = Path(dicom_node.__file__).resolve().parent
        self._process = subprocess.Popen(
            [str(python_of(self.runtime)), "-I", "-c", BOOTSTRAP, str(package)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.runtime)
        for pipe in (self._process.stdin, self._process.stdout):
            widen(pipe)
        threading.Thread(target=self._log_lines, args=(self._process.stderr,), daemon=True,
                         name=f"runtime {self.runtime.name}").start()
        try:
            loaded, _ = self._exchange({"op": "load", "bundle_dir": str(self.bundle_dir),
                                        "device": self.device_setting})
        except BaseException:
            self.close()
            raise
        self.weight_mb = float(loaded["weight_mb"])
        self.versions = dict(loaded["versions"])
        log.info("loaded bundle %s %s in runtime %s (MONAI %s, NumPy %s) on %s in %.1f s (%.0f MB of weights)",
                 self.info.name, self.info.version, self.runtime.name, self.versions.get("monai"),
                 self.versions.get("numpy"), loaded["device"], time.perf_counter() - started, self.weight_mb)

    def _log_lines(self, stream: IO[bytes]) -> None:
        """The runner's log and whatever the bundle prints, into the worker's log, line by line."""
        for raw in iter(lambda: stream.readline(LOG_LINE_BYTES), b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._last_words.append(line)
            levelled = _LEVELLED.fullmatch(line)
            level, text = (int(levelled.group(1)), f"{levelled.group(2)}: {_multiline(levelled.group(3))}") \
                if levelled else (logging.INFO, line)
            log.log(level, "runtime %s: %s", self.runtime.name, text)

    def _exchange(self, header: dict, array: np.ndarray | None = None) -> tuple[dict, np.ndarray | None]:
        """One request and its answer. Anything that cuts the exchange short (the job's time
        limit, a shutdown) leaves the runner in the middle of a message: it is stopped, and
        the next request starts a new one."""
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        try:
            send(process.stdin, header, array)
            reply, result = receive(process.stdout)
        except (WireError, BrokenPipeError) as error:
            code = self.close()
            raise RuntimeExited(f"the bundle's runtime {self.runtime.name} ended (exit code {code}) while "
                                f"{header['op']}ing; its last words: {' | '.join(self._last_words)[-600:]}") from error
        except BaseException:
            self.close(at_once=True)
            raise
        if not reply.get("ok"):
            problem = str(reply.get("problem"))
            raise MemoryError(problem) if reply.get("memory") else DiagnosedError(problem)
        return reply, result

    def predict(self, volume: Volume) -> np.ndarray:
        """Label map on the volume's own grid, as `Bundle.predict` gives it."""
        return self.predict_array(volume.array, volume.affine_ras, volume.name)

    def predict_array(self, array: np.ndarray, affine_ras: np.ndarray, name: str) -> np.ndarray:
        if self._process is None or self._process.poll() is not None:
            self.close()
            self._start()
        started = time.perf_counter()
        reply, labels = self._exchange({"op": "predict", "affine_ras": np.asarray(affine_ras).tolist(),
                                        "name": name}, array)
        if labels is None or labels.shape != array.shape:
            raise DiagnosedError(f"the runtime answered a label map of shape "
                                 f"{None if labels is None else labels.shape}, not {array.shape}")
        self.timings = {step: float(seconds) for step, seconds in reply["timings"].items()}
        self.timings["runtime_pipe"] = max(0.0, time.perf_counter() - started - sum(self.timings.values()))
        return labels

    def close(self, at_once: bool = False) -> int | None:
        """Stop the runner, and say how it ended: its stdin closes, and it is killed if it does
        not end soon (or ``at_once``, when it is in the middle of a request nobody waits for any
        more). None when there was no runner."""
        process, self._process = self._process, None
        if process is None:
            return None
        if at_once:
            process.kill()
        for stream in (process.stdin, process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            return process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
