"""The software box's end of a serial line: a real port, or a pty it "plugs in" itself.

A pty made here stands in for a USB-serial box appearing under /dev/serial/by-id/: the
node's end is published as a symlink at ``link``, and unplugging closes the pty and
removes the link, exactly what the bridge sees when a cable is pulled.
"""

from __future__ import annotations

import os
import select
import tty
from pathlib import Path

import serial


class LineDown(Exception):
    """The other end is gone, or the line is unplugged."""


class PtyLine:
    """A pty pair; the box holds the master, the node opens the slave through ``link``."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self._master = -1
        self._slave = -1
        self.plug()

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line editing before the node opens it
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        tmp = self.link.with_name(self.link.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(slave))
        os.replace(tmp, self.link)

    def unplug(self) -> None:
        self.link.unlink(missing_ok=True)
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1

    close = unplug

    def read(self, timeout: float) -> bytes:
        if self._master < 0:
            raise LineDown("unplugged")
        ready, _, _ = select.select([self._master], [], [], timeout)
        if not ready:
            return b""
        try:
            return os.read(self._master, 4096)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise LineDown(str(exc)) from None

    def write(self, data: bytes, timeout: float = 1.0) -> bool:
        """False when the node is not reading and the bytes are lost, as on a real UART."""
        view = memoryview(data)
        while view:
            if self._master < 0:
                raise LineDown("unplugged")
            _, ready, _ = select.select([], [self._master], [], timeout)
            if not ready:
                return False
            try:
                view = view[os.write(self._master, view):]
            except BlockingIOError:
                continue
            except OSError as exc:
                raise LineDown(str(exc)) from None
        return True


class SerialLine:
    """A real serial device (a USB-serial adapter, or one end of a socat pty pair)."""

    def __init__(self, port: str, baud: int) -> None:
        self.name, self.baud = port, baud
        self._port: serial.Serial | None = None
        self.plug()

    def plug(self) -> None:
        self._port = serial.Serial(self.name, self.baud, timeout=0, write_timeout=1.0)

    def unplug(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None

    close = unplug

    def read(self, timeout: float) -> bytes:
        if self._port is None:
            raise LineDown("unplugged")
        try:
            self._port.timeout = timeout
            return bytes(self._port.read(max(1, self._port.in_waiting)))
        except (serial.SerialException, OSError) as exc:
            raise LineDown(str(exc)) from None

    def write(self, data: bytes, timeout: float = 1.0) -> bool:
        if self._port is None:
            raise LineDown("unplugged")
        try:
            self._port.write(data)
            return True
        except serial.SerialTimeoutException:
            return False
        except (serial.SerialException, OSError) as exc:
            raise LineDown(str(exc)) from None
