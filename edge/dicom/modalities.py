"""Which peers on the LAN are the clinic's own modalities: the DR and ``other_modalities``.

The worklist answers only them, and they keep a DICOM slot when strangers crowd the port.
A modality is known by its AE title *and* its address, because an AE title is just a
string anyone can send. Host names are resolved once a minute, not on every association.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass

from edge.config.sections import DicomSection

log = logging.getLogger(__name__)

RESOLVE_EVERY_S = 60.0


@dataclass(frozen=True)
class Modality:
    """One configured modality: the AE title it calls with and the host it calls from."""

    ae_title: str
    host: str


def configured_modalities(cfg: DicomSection) -> list[Modality]:
    """The DR (``modality_ae`` @ ``modality_host``, when a host is set) and ``other_modalities``."""
    host = cfg.modality_host.strip()  # " 192.168.1.20" from a hand-edited file is that address, not a host name
    found = [Modality(cfg.modality_ae, host)] if host else []
    for value in cfg.other_modalities:
        ae, _, host = value.partition("@")
        found.append(Modality(ae, host))
    return found


def _addresses(host: str) -> frozenset[str]:
    """Every address ``host`` stands for (itself when it is one); empty if it does not resolve."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("dicom: cannot resolve modality host %s: %s", host, exc)
        return frozenset()
    return frozenset(str(ipaddress.ip_address(info[4][0])) for info in infos)


def _normal(address: str) -> str:
    """An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d: compare it as a.b.c.d."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class ModalityDirectory:
    """Answers "is this peer one of ours?" from pynetdicom's threads; safe to share."""

    def __init__(self, cfg: DicomSection) -> None:
        self.modalities = configured_modalities(cfg)
        self._lock = threading.Lock()
        self._resolved: dict[str, frozenset[str]] = {}
        self._resolved_at = float("-inf")

    @property
    def configured(self) -> bool:
        """False on a first run: no modality is configured yet, so the worklist stays closed."""
        return bool(self.modalities)

    def _host_addresses(self) -> dict[str, frozenset[str]]:
        with self._lock:
            if time.monotonic() - self._resolved_at >= RESOLVE_EVERY_S:
                self._resolved = {m.host: _addresses(m.host) for m in self.modalities}
                self._resolved_at = time.monotonic()
            return self._resolved

    def is_modality(self, ae_title: str, address: str) -> bool:
        """True when both the calling AE title and the peer address match one configured modality."""
        ae_title, address = ae_title.strip(), _normal(address)
        hosts = self._host_addresses()
        return any(m.ae_title == ae_title and address in hosts.get(m.host, ()) for m in self.modalities)

    def is_modality_address(self, address: str) -> bool:
        """True when the address is a configured modality's (before its AE title is known: at TCP accept)."""
        address = _normal(address)
        return any(address in addrs for addrs in self._host_addresses().values())
