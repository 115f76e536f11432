"""Zeroconf (DNS-SD over mDNS): the node announces itself, ``edge discover`` finds others.

``_dicom._tcp`` with TXT ``aet=<AE title>`` lets a DR (or a technician's laptop) find
the node without typing its address; ``_http._tcp`` points at the console. A record is
announced only while its service runs, so the LAN never sees a service that is down, and
every record is withdrawn (goodbye packets) when the node stops. Whether DICOM runs is read
from the service's own report (``edge.ops.health.dicom_availability``), never by connecting:
a probe every refresh would take one of the DR's association slots.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import asdict, dataclass
from typing import Any

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from edge.node.config import EdgeConfig
from edge.ops.health import dicom_availability, port_listening

log = logging.getLogger(__name__)

DICOM_TYPE = "_dicom._tcp.local."
HTTP_TYPE = "_http._tcp.local."
HTTPS_TYPE = "_https._tcp.local."  # the console with [console] tls_cert: a browser following it must use https
BROWSED_TYPES = (DICOM_TYPE, HTTP_TYPE, HTTPS_TYPE)
_MAX_LABEL = 63  # bytes in one DNS label (the service instance name)


def resolve_interfaces(interfaces: list[str]) -> list[str]:
    """IP addresses for zeroconf: addresses pass through, interface names become their addresses."""
    adapters = {a.nice_name: a for a in ifaddr.get_adapters()}
    addresses: list[str] = []
    for item in interfaces:
        try:
            addresses.append(str(ipaddress.ip_address(item)))
            continue
        except ValueError:
            pass
        adapter = adapters.get(item)
        if adapter is None:
            raise ValueError(f"[ops] zeroconf_interfaces: no interface named {item!r} (have {', '.join(sorted(adapters))})")
        addresses += [str(ip.ip) for ip in adapter.ips if ip.is_IPv4]
    return addresses


def _advertised(interfaces: list[str]) -> list[str]:
    if interfaces:
        return resolve_interfaces(interfaces)
    return [
        str(ip.ip)
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if ip.is_IPv4 and not ipaddress.ip_address(str(ip.ip)).is_loopback
    ]


def open_zeroconf(interfaces: list[str]) -> AsyncZeroconf:
    """On the configured interfaces only ([] = all), IPv4 unless an IPv6 address is named."""
    if not interfaces:
        return AsyncZeroconf(ip_version=IPVersion.V4Only)
    addresses = resolve_interfaces(interfaces)
    if not addresses:
        raise ValueError(f"[ops] zeroconf_interfaces: {', '.join(interfaces)} have no IPv4 address")
    v6 = any(ipaddress.ip_address(a).version == 6 for a in addresses)
    return AsyncZeroconf(interfaces=addresses, ip_version=IPVersion.All if v6 else IPVersion.V4Only)


def _instance_name(config: EdgeConfig, what: str) -> str:
    name = f"{config.node.name} {what} ({config.node.id})"
    while len(name.encode()) > _MAX_LABEL:
        name = name[:-1]
    return name.replace(".", " ")


def service_infos(config: EdgeConfig) -> dict[str, tuple[AsyncServiceInfo, str, int]]:
    """service name → (record, bind address, port) for everything this node may announce."""
    addresses = [socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in _advertised(config.ops.zeroconf_interfaces)]
    host = f"{config.node.id}.local."
    common = {"node_id": config.node.id}
    infos: dict[str, tuple[AsyncServiceInfo, str, int]] = {}
    dicom = config.dicom
    infos["dicom"] = (
        AsyncServiceInfo(
            DICOM_TYPE, f"{_instance_name(config, 'DICOM')}.{DICOM_TYPE}", port=dicom.port,
            properties={"aet": dicom.ae_title, **common}, addresses=addresses, server=host,
        ),
        dicom.bind_address, dicom.port,
    )
    console = config.console
    console_type = HTTPS_TYPE if console.tls_cert else HTTP_TYPE  # it serves https only then
    infos["console"] = (
        AsyncServiceInfo(
            console_type, f"{_instance_name(config, 'console')}.{console_type}", port=console.port,
            properties={"path": "/", "role": "console", **common}, addresses=addresses, server=host,
        ),
        console.bind_address, console.port,
    )
    # The kiosk adds its own _http._tcp record here once it listens (role=kiosk).
    return infos


class Announcer:
    """Keeps the node's records in step with which of its ports are up; ``stop()`` withdraws all."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self._zc: AsyncZeroconf | None = None
        self._infos = service_infos(config)
        self._announced: set[str] = set()

    @property
    def announced(self) -> set[str]:
        return set(self._announced)

    async def start(self) -> None:
        self._zc = open_zeroconf(self.config.ops.zeroconf_interfaces)
        await self.refresh()

    def _is_up(self, name: str, address: str, port: int) -> bool:
        if name == "dicom":  # the DICOM service's report: a connection would cost the DR a slot
            return dicom_availability(self.config) is not None
        return port_listening(address, port, 0.5)

    async def refresh(self) -> None:
        """Announce what runs, withdraw what stopped (file reads and port probes run off the loop)."""
        if self._zc is None:
            return
        for name, (info, address, port) in self._infos.items():
            up = await asyncio.to_thread(self._is_up, name, address, port)
            if up and name not in self._announced:
                await self._zc.async_register_service(info, allow_name_change=True)
                self._announced.add(name)
                log.info("zeroconf: announcing %s (%s port %d)", info.name, info.type, port)
            elif not up and name in self._announced:
                await self._zc.async_unregister_service(info)
                self._announced.discard(name)
                log.info("zeroconf: withdrew %s (service on port %d down)", info.name, port)

    async def stop(self) -> None:
        if self._zc is None:
            return
        if self._announced:
            await self._zc.async_unregister_all_services()
            log.info("zeroconf: withdrew %d record(s)", len(self._announced))
            self._announced.clear()
        await self._zc.async_close()
        self._zc = None


@dataclass(frozen=True)
class Found:
    type: str
    name: str
    addresses: list[str]
    port: int
    properties: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


async def discover(interfaces: list[str], timeout_s: float = 3.0) -> list[Found]:
    """Browse the LAN for ``timeout_s`` and resolve everything seen."""
    azc = open_zeroconf(interfaces)
    names: set[tuple[str, str]] = set()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.add((service_type, name))
        else:
            names.discard((service_type, name))

    browser = AsyncServiceBrowser(azc.zeroconf, list(BROWSED_TYPES), handlers=[on_change])
    try:
        await asyncio.sleep(timeout_s)
        found: list[Found] = []
        for service_type, name in sorted(names):
            info = AsyncServiceInfo(service_type, name)
            if not await info.async_request(azc.zeroconf, 3000):  # a responder may hold back an answer it just sent
                continue
            props = {
                k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()
            }
            found.append(Found(service_type, name, info.parsed_addresses(), info.port or 0, props))
        return found
    finally:
        await browser.async_cancel()
        await azc.async_close()
