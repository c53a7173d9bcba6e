"""The node's log: one line a record, on standard error, the same in every process."""

from __future__ import annotations

import logging
import sys

from dicom_node.printable import printable


class PrintableFormatter(logging.Formatter):
    """Every log line is one line of printable text, whatever a peer put in the values it
    names (`printable`); a traceback keeps its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # pynetdicom and highdicom narrate every PDU and module at INFO; operators need our lines.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
