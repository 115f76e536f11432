"""What every service of the node is: a start()/stop() pair, and the error that stops start-up."""

from __future__ import annotations

from typing import Protocol


class Service(Protocol):
    """Started in order by ``edge run`` / ``edge serve``, stopped in reverse."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ServiceSetupError(Exception):
    """A service cannot start as configured; the message names the key or the cause."""
