"""systemd's readiness and watchdog protocol (sd_notify(3)), over $NOTIFY_SOCKET.

A dozen lines of socket code rather than a dependency: ``sdnotify`` on PyPI has had no
release since 2017 and ``systemd-python`` needs libsystemd headers to build, while
sd_notify(3) documents the datagram protocol as stable and meant to be reimplemented.
Without $NOTIFY_SOCKET (not under systemd, or ``Type=simple``) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``READY=1``-style fields in one datagram; False when there is no socket to send to."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or not fields:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("sd_notify: cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half of $WATCHDOG_USEC (systemd's advice), or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def keep_watchdog_fed(interval_s: float) -> None:
    """``WATCHDOG=1`` from the event loop: if the loop hangs, pings stop and systemd restarts us."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)
