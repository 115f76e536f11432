"""Which peers on the LAN are the clinic's own modalities: the DR and ``other_modalities``.

The worklist answers only them, and they keep a DICOM slot when strangers crowd the port.
A modality is known by its AE title *and* its address, because an AE title is just a
string anyone can send. Host names are resolved once a minute, not on every association,
and never on the caller's thread: a worklist or accept thread asking while DNS is down gets
the last answer at once instead of queueing behind a lookup that takes the resolver's
timeout (5 s or more per try).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge.config.sections import DicomSection

log = logging.getLogger(__name__)

RESOLVE_EVERY_S = 60.0  # a host name that resolved is looked up again after this long
RETRY_FAILED_S = 5.0  # one that did not is tried again this soon: the DR is not locked out for a minute


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


def _literal(host: str) -> frozenset[str] | None:
    """The host as an address set when it is an address already (no lookup), else None."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        return None


def _addresses(host: str) -> frozenset[str]:
    """Every address ``host`` stands for (itself when it is one); empty if it does not resolve."""
    literal = _literal(host)
    if literal is not None:
        return literal
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("cannot resolve modality host %s: %s", host, exc)
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
    """Answers "is this peer one of ours?" from pynetdicom's threads; safe to share.

    Host names are looked up by one resolver thread at a time, started when an answer is
    due; callers never wait for it and read the answers as they stand. A name that does not
    resolve is tried again after ``RETRY_FAILED_S``; while it fails, its last good addresses
    (if any) still count, so a DNS outage does not lock the DR out. Before a name's first
    answer it matches nobody.
    """

    def __init__(self, cfg: DicomSection, clock: Callable[[], float] = time.monotonic) -> None:
        self.modalities = configured_modalities(cfg)
        self._clock = clock
        self._lock = threading.Lock()  # guards the fields below; never held during a lookup
        literals = {m.host: a for m in self.modalities if (a := _literal(m.host)) is not None}
        self._resolved: dict[str, frozenset[str]] = dict(literals)  # replaced whole, never changed in place
        self._due_at = {m.host: float("-inf") for m in self.modalities if m.host not in literals}
        self._resolver: threading.Thread | None = None
        if self._due_at:
            self._host_addresses()  # start the first lookups now, before the DR's first association

    @property
    def configured(self) -> bool:
        """False on a first run: no modality is configured yet, so the worklist stays closed."""
        return bool(self.modalities)

    def _host_addresses(self) -> dict[str, frozenset[str]]:
        """The answers as they stand; starts the resolver when a lookup is due and none is running."""
        with self._lock:
            now = self._clock()
            due = [host for host, at in self._due_at.items() if now >= at]
            if due and self._resolver is None:
                self._resolver = threading.Thread(target=self._resolve, args=(due,), name="modality-resolver",
                                                  daemon=True)
                self._resolver.start()
            return self._resolved

    def _resolve(self, hosts: list[str]) -> None:
        try:
            for host in hosts:
                addresses = _addresses(host)  # outside the lock: this is what can take the resolver's timeout
                with self._lock:
                    if addresses:
                        self._resolved = {**self._resolved, host: addresses}
                    self._due_at[host] = self._clock() + (RESOLVE_EVERY_S if addresses else RETRY_FAILED_S)
        finally:
            with self._lock:
                self._resolver = None

    def wait_resolved(self, timeout: float) -> bool:
        """Wait for the running lookups (start-up, tests); True when none is running any more."""
        with self._lock:
            resolver = self._resolver
        if resolver is not None:
            resolver.join(timeout)
            return not resolver.is_alive()
        return True

    def is_modality(self, ae_title: str, address: str) -> bool:
        """True when both the calling AE title and the peer address match one configured modality."""
        ae_title, address = ae_title.strip(), _normal(address)
        hosts = self._host_addresses()
        return any(m.ae_title == ae_title and address in hosts.get(m.host, ()) for m in self.modalities)

    def is_modality_address(self, address: str) -> bool:
        """True when the address is a configured modality's (before its AE title is known: at TCP accept)."""
        address = _normal(address)
        return any(address in addrs for addrs in self._host_addresses().values())
