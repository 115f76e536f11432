"""A wake that arrives while a slot finds the outbox empty is not lost until the next poll.

The DICOM service keeps a row and rings the bell just after a slot's look found nothing;
the slot used to clear the event after that look, so the new study waited for the poll
(600 s here) instead of going at once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sync import worker as worker_module
from sync.config import SyncSection
from sync.worker import OutboxWorker


def test_a_wake_during_the_empty_look_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(worker_module, "next_attempt_at", lambda routine: None)  # nothing parked
    outbox = OutboxWorker(SyncSection(concurrency=1, poll_interval_s=600.0), spool=None, client=None,  # type: ignore[arg-type]
                          tmp_dir=tmp_path)
    looks: list[str] = []
    second_look = asyncio.Event()

    async def send_next() -> bool:
        looks.append("look")
        if len(looks) == 1:
            outbox.wake()  # a C-STORE kept a row right after this look found the outbox empty
            return False
        second_look.set()
        await asyncio.Event().wait()  # the slot is busy with it from here on
        return True

    monkeypatch.setattr(outbox, "send_next", send_next)

    async def scenario() -> Any:
        slot = asyncio.create_task(outbox._slot(0))
        try:
            await asyncio.wait_for(second_look.wait(), 30.0)  # far below the 600 s poll
        finally:
            slot.cancel()
            await asyncio.gather(slot, return_exceptions=True)

    asyncio.run(scenario())
    assert looks == ["look", "look"]
