"""The failure status datasets the node answers with, and what their Error Comment may hold.

Error Comment (0000,0902) is LO: at most 64 characters of the default repertoire, and a
backslash separates values. A reason that quotes the sender's bytes (``'1.2\\x01'``) or
a path would reach the DR as several values, of which it shows the first, or as
"Non-conformant VM for ErrorComment". Every failure status is built here.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

ERROR_COMMENT_MAX = 64
# Control characters (C0, DEL, C1) and everything outside printable ASCII but the space.
_NOT_LO = re.compile(r"[^\x20-\x7e]")


def error_comment(text: str) -> str:
    """``text`` as one LO value: backslash as '/', control characters dropped, other non-ASCII as '?', 64 characters."""
    text = text.replace("\\", "/")
    text = _NOT_LO.sub(lambda m: "" if ord(m.group()) < 0x20 or 0x7F <= ord(m.group()) <= 0x9F else "?", text)
    return text.strip()[:ERROR_COMMENT_MAX].rstrip()


def failure_status(code: int, comment: str) -> Dataset:
    """A status dataset whose Error Comment the modality can show whole."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = error_comment(comment)
    return ds
