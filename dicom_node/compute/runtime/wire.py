"""How the worker and a runtime's runner talk: a line of JSON, then the bytes of one array.

Arrays cross as their raw memory, in the order they lie in, so that neither side copies a
volume of a few hundred megabytes to send or to receive it. Both sides bound what they read:
a header is one line of at most MAX_HEADER_BYTES, and an array's size is checked against its
shape before anything is allocated for it.
"""

from __future__ import annotations

import fcntl
import json
from typing import BinaryIO

import numpy as np

MAX_HEADER_BYTES = 1 << 20
MAX_ARRAY_BYTES = 16 << 30  # a 1024 x 1024 x 4000 float32 volume, and then some
DTYPES = ("float32", "float64", "int16", "uint16", "int32", "uint8")


PIPE_BYTES = 1 << 20  # Linux's default limit for an unprivileged pipe; 16 times its default size
_F_SETPIPE_SZ = 1031


def widen(pipe: BinaryIO) -> None:
    """A larger pipe buffer: a volume then crosses in fewer turns of the two processes."""
    try:
        fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass  # not Linux, or a lower limit: the default buffer works, a little slower


class WireError(EOFError):
    """The other side closed the pipe or sent what this protocol does not allow."""


def send(stream: BinaryIO, header: dict, array: np.ndarray | None = None) -> None:
    """``header`` as a line, then ``array``'s memory. A Fortran-ordered array goes as its
    transpose's C memory, marked ``order: F``, and arrives Fortran-ordered again."""
    if array is not None:
        if array.flags.f_contiguous and not array.flags.c_contiguous:
            memory, order = array.T, "F"
        else:
            memory, order = np.ascontiguousarray(array), "C"
        header = {**header, "array": {"shape": list(array.shape), "dtype": str(array.dtype), "order": order}}
    stream.write(json.dumps(header).encode() + b"\n")
    if array is not None:
        stream.write(memoryview(memory).cast("B"))
    stream.flush()


def receive(stream: BinaryIO) -> tuple[dict, np.ndarray | None]:
    """The next message: its header, and its array when it has one."""
    line = stream.readline(MAX_HEADER_BYTES + 1)
    if not line:
        raise WireError("the other side closed the pipe")
    if len(line) > MAX_HEADER_BYTES or not line.endswith(b"\n"):
        raise WireError(f"a header longer than {MAX_HEADER_BYTES} bytes")
    header = json.loads(line)
    described = header.pop("array", None)
    if described is None:
        return header, None
    return header, _receive_array(stream, described)


def _receive_array(stream: BinaryIO, described: dict) -> np.ndarray:
    shape = tuple(int(n) for n in described["shape"])
    if described["dtype"] not in DTYPES:
        raise WireError(f"an array of {described['dtype']!r}")
    dtype = np.dtype(described["dtype"])
    if any(n < 0 for n in shape) or len(shape) > 4 or described["order"] not in ("C", "F"):
        raise WireError(f"an array of shape {shape} in order {described['order']!r}")
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size > MAX_ARRAY_BYTES:
        raise WireError(f"an array of {size} bytes, more than {MAX_ARRAY_BYTES}")
    array = np.empty(shape[::-1] if described["order"] == "F" else shape, dtype=dtype)
    buffer = memoryview(array).cast("B")
    filled = 0
    while filled < size:
        read = stream.readinto(buffer[filled:])
        if not read:
            raise WireError(f"the pipe closed {size - filled} bytes before the end of an array")
        filled += read
    return array.T if described["order"] == "F" else array
