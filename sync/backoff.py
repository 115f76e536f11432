"""A tenacity wait strategy asked outside a retry loop: "how long before the n-th attempt?".

The outbox parks rows and the report puller schedules polls in the database, long after the
attempt that failed; they still want tenacity's jittered exponential, which only answers a
``RetryCallState``. This builds the one it needs (tenacity reads ``attempt_number`` only).
"""

from __future__ import annotations

from tenacity import RetryCallState
from tenacity.wait import wait_base


def wait_before_attempt(wait: wait_base, attempt: int) -> float:
    """Seconds ``wait`` gives before the ``attempt``-th attempt (1 = the first retry)."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return float(wait(state))
