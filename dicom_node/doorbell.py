"""Doorbells: one process of the node tells another that the database has news for it.

Stages hand work over through the database and look at it every tick, which costs each
hand-over half a tick on average. Between the processes of one node a doorbell cuts that wait
short: completion rings the workers when it has queued jobs, a worker rings the dispatchers
when it has recorded results. The database stays the truth: a ring only ends a wait early, so
a lost ring costs one tick, and a worker on another host, which hears no bell, works as before.

A bell is a pipe. Ringing writes a few bytes without blocking (a full pipe already rings),
ringing a bell whose listener died does nothing, and nothing is shared that a killed process
could leave locked (as a lock inside a multiprocessing Event could be).
"""

from __future__ import annotations

import multiprocessing.connection
import os
from dataclasses import dataclass
from multiprocessing.context import BaseContext


@dataclass
class Bell:
    """The listening end, in the process that waits."""

    listener: multiprocessing.connection.Connection

    def wait(self, seconds: float) -> bool:
        """Wait at most ``seconds`` for a ring; True if rung (every ring so far is taken)."""
        rung = self.listener.poll(seconds)
        while self.listener.poll(0):
            self.listener.recv_bytes()
        return rung


@dataclass
class Ringer:
    """The ringing end, which may be passed to other processes."""

    pipe: multiprocessing.connection.Connection

    def ring(self) -> None:
        try:
            os.set_blocking(self.pipe.fileno(), False)
            self.pipe.send_bytes(b"")  # 4 bytes: written whole or not at all
        except OSError:
            pass  # already rung and not yet heard, or nobody listens any more


def doorbell(context: BaseContext) -> tuple[Bell, Ringer]:
    listener, pipe = context.Pipe(duplex=False)
    return Bell(listener), Ringer(pipe)
