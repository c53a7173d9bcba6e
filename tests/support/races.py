"""Two writers colliding on one database, in a fixed order, so that a race is a test."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

# Long enough for the second writer to reach the statement that waits for the first.
_HEAD_START_SECONDS = 1.0


def second_writer_while_the_first_is_open(
    first_transaction: AbstractContextManager[Any],
    first_write: Callable[[Any], None],
    second_write: Callable[[], None],
) -> list[Exception]:
    """What ``second_write`` raised, started while ``first_write`` is done but not committed.

    The second writer waits for the first (on the row's key with PostgreSQL, on the write lock
    with SQLite) and runs its statements once the first commits: the order two nodes on one
    database meet in. Errors are returned, not raised, so that the test names what the race did.
    """
    errors: list[Exception] = []

    def second() -> None:
        try:
            second_write()
        except Exception as error:  # noqa: BLE001 - the test reports whatever the race raises
            errors.append(error)

    with first_transaction as held:
        first_write(held)
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=_HEAD_START_SECONDS)
    thread.join(timeout=30)
    return errors
