"""The node's log: one line a record, on standard error, the same in every process."""

from __future__ import annotations

import logging
import sys
import warnings

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
    quiet_library_warnings()


def quiet_library_warnings() -> None:
    """Keep out of the log what libraries warn about on every job and an operator cannot act
    on: MONAI's notices of changed defaults (the bundle is run as it was written), its note
    that NVIDIA's image decoder is absent (pydicom decodes), and highdicom's advice on how
    person names are written (they are copied from the source images as they are). What an
    operator can act on is said once, by the worker at start-up (its devices)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*nvImageCodec.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"highdicom(\.|$)", message=r".*[Pp]erson.*[Nn]ame.*")
