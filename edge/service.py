"""What every service of the node is: a start()/stop() pair, the error that stops start-up, and its tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Service(Protocol):
    """Started in order by ``edge run`` / ``edge serve``, stopped in reverse."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ServiceSetupError(Exception):
    """A service cannot start as configured; the message names the key or the cause."""


class BackgroundTasks:
    """A service's named asyncio tasks: started as it starts, cancelled and awaited as it stops.

    A task that ends with an error (rather than by cancel) is logged with its name when it
    ends, so a crashed loop is never swallowed by a gather nobody reads.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as the task ``name`` until it ends or :meth:`stop`."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: %s crashed: %r", self.owner, task.get_name(), task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def stop(self, timeout_s: float | None = None) -> None:
        """Cancel every task and wait for them to end (at most ``timeout_s``; the stuck ones are named)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=timeout_s)
        for task in stuck:
            log.warning("%s: %s did not stop within %.0f s", self.owner, task.get_name(), timeout_s or 0)
