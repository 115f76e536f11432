"""What the ``edge`` command prints of values it did not write itself.

A PatientName, a cloud's error text, a box's firmware string or a user's input can hold
terminal control codes: ``ESC[2J`` clears the technician's screen, an OSC sequence
retitles the window, ``\\x9b`` is a one-byte CSI on some terminals. Every such value goes
through :func:`printable` on its way to a human's terminal, so the only line breaks and
control codes in ``edge`` output are the ones the command put there itself.
``--json`` output needs nothing: ``json.dumps`` escapes every control character.
"""

from __future__ import annotations

import logging
import re

# C0 controls (tab and newline too: a value never breaks the CLI's own lines), DEL, C1
# controls, lone surrogates (a bad decode: print() would raise), Unicode line and
# paragraph separators, and bidi overrides/isolates (they reorder what the eye reads).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]")
REPLACEMENT = "?"


def printable(value: object) -> str:
    """``str(value)`` with every control character replaced by ``?``; safe for a terminal."""
    return _UNPRINTABLE.sub(REPLACEMENT, value if isinstance(value, str) else str(value))


class TerminalFormatter(logging.Formatter):
    """Log lines on a technician's terminal quote boxes and images too: each line goes through :func:`printable`.

    For entry points that log to stderr (``edge ecg-firmware``, ``edge ecg-sim``); a traceback
    keeps its own line breaks, every other control code is replaced.
    """

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(printable(line) for line in super().format(record).split("\n"))
