"""Peer-controlled text made safe to print: one line, no terminal control sequences.

UIDs, AE titles and patient data come from the network. Written raw, a newline forges a log
line and an escape sequence reaches the operator's terminal (retitling it, hiding text,
worse). What the node prints passes through `printable` where it is printed: every log
line, in the log formatter, and each value from the network in the command line's output.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the bidirectional
# overrides and isolates that reorder what a terminal shows.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character written as its escape (``\\x0a``, ``\\x1b``)."""
    return _UNPRINTABLE.sub(_escape, text)

