"""Whether something listens on a TCP port: for health, status and doctor checks of any part."""

from __future__ import annotations

import socket


def port_listening(address: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections there (0.0.0.0 means this host).

    A real connection: never for the DICOM port in a health check (it would take one of
    the DR's slots; see dicom_availability), only where a human asks for a real probe.
    """
    host = "127.0.0.1" if address in ("0.0.0.0", "", "::") else address
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
