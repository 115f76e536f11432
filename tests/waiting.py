"""Waiting on a condition a user would watch for, with a deadline instead of a fixed sleep.

The one polling helper of the suite: every test that waits for the node imports it from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(
    check: Callable[[], Any],
    timeout: float = 60.0,
    what: str = "condition",
    every: float = 0.1,
    detail: Callable[[], object] | None = None,
) -> Any:
    """``check()``'s first truthy value; AssertionError naming ``what`` once ``timeout`` seconds pass.

    ``detail``: what to show beside the timeout (the figures seen last, the node's log), so a
    failure says more than "timed out".
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    message = f"timed out after {timeout}s waiting for {what}"
    raise AssertionError(f"{message}:\n{detail()}" if detail is not None else message)
