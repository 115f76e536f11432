"""A doorbell to the sync service from the process that kept an instance, so its upload starts at once.

In one process the DICOM service wakes the sync worker by a call. Under `edge run` (ingest
and sync are separate child processes) and under the systemd units they are separate
processes, and without this the worker found new instances only at its next
``[sync] poll_interval_s``. A datagram on a Unix socket beside the database costs nothing
when no one listens, never blocks a C-STORE, and needs no other process to be up; the
outbox in the database stays the truth, the bell only says "look now".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, with room for the terminating NUL


def bell_address(data_dir: Path) -> str:
    """``<data_dir>/run/sync.bell``, or an abstract socket named after it when that path is too long."""
    path = data_dir.resolve() / "run" / "sync.bell"
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        return str(path)
    return "\0clinic-edge-sync-bell-" + hashlib.sha256(os.fsencode(path)).hexdigest()[:32]


class OutboxBell:
    """The ringing side: ``ring()`` is safe from any thread and never blocks or raises."""

    def __init__(self, data_dir: Path) -> None:
        self.address = bell_address(data_dir)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)

    def ring(self) -> None:
        with contextlib.suppress(OSError):  # no sync listening (not started, or off): it polls when it comes
            self._sock.sendto(b"!", self.address)


class BellListener:
    """The sync side: calls ``on_ring`` once per burst of rings, from the event loop."""

    def __init__(self, data_dir: Path, on_ring: Callable[[], None]) -> None:
        self.address = bell_address(data_dir)
        self._on_ring = on_ring
        self._sock: socket.socket | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        if not self.address.startswith("\0"):
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(self.address), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)  # left by a sync process that was killed
        try:
            sock.bind(self.address)
        except OSError as exc:
            sock.close()
            log.warning("sync: cannot listen for new instances at %r (%s); relying on [sync] poll_interval_s",
                        self.address, exc.strerror or exc)
            return
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._drain)

    def _drain(self) -> None:
        assert self._sock is not None
        rung = False
        while True:
            try:
                self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            rung = True
        if rung:
            self._on_ring()

    def stop(self) -> None:
        if self._sock is None:
            return
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        if not self.address.startswith("\0"):
            with contextlib.suppress(OSError):
                os.unlink(self.address)
