"""``edge doctor``: the field engineer's checklist, one pass/fail line per item with a fix.

Each item asks the real thing (a C-ECHO to the DR, a QIDO-RS to the cloud, a browse
for our own zeroconf record) rather than reading the config back, so a pass means it
works from this box now. ``warn`` and ``skip`` never fail the run; ``fail`` does.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import cast

from edge.node.config import EdgeConfig
from edge.ops.health import disk_free_bytes, port_listening
from edge.part import DoctorCheck, Part, Verdict
from edge.part import DoctorItem as Item
from edge.terminal import printable
from kiosk.doctor import check_printer

log = logging.getLogger(__name__)

__all__ = ["Item", "Verdict", "check_printer", "format_items", "run_doctor"]  # check_printer: the kiosk's, for its tests


def check_config(config: EdgeConfig, path: str) -> Item:
    return Item("config", "pass", f"{path} valid (node {config.node.id}, AE title {config.dicom.ae_title})")


def check_disk(config: EdgeConfig) -> Item:
    data_dir = config.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Item("disk", "fail", f"cannot write to {data_dir}: {exc.strerror}",
                    f"check the data partition is mounted and owned by the node's user (chown edge: {data_dir})")
    free_mb = disk_free_bytes(config) / 2**20
    total_mb = shutil.disk_usage(data_dir).total / 2**20
    detail = f"{data_dir}: {free_mb:.0f} MB free of {total_mb:.0f} MB (minimum {config.storage.min_free_mb} MB)"
    if free_mb < config.storage.min_free_mb:
        return Item("disk", "fail", detail, "free space: check `edge studies` for studies stuck unsynced; the node never evicts those")
    if free_mb < config.storage.high_water_free_mb:
        return Item("disk", "warn", detail, "below [storage] high_water_free_mb: synced studies are being evicted early")
    return Item("disk", "pass", detail)


def _dm_crypt(path: Path) -> bool | None:
    """Whether ``path`` lives on a dm-crypt (LUKS) device; None when it cannot be told."""
    try:
        dev = os.stat(path).st_dev
        sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/dm/uuid")
        if not sysfs.exists():
            return False
        return sysfs.read_text().startswith("CRYPT-")
    except OSError:
        return None


def check_encryption(config: EdgeConfig) -> Item:
    crypt = _dm_crypt(config.data_dir)
    if crypt:
        return Item("encryption", "pass", f"{config.data_dir} is on a LUKS (dm-crypt) device")
    return Item("encryption", "warn", f"{config.data_dir} is not on an encrypted device" + (" (cannot tell)" if crypt is None else ""),
                "on the appliance the data partition is LUKS; a development machine is expected to warn here")


def check_tpm(config: EdgeConfig, tpm: Path = Path("/sys/class/tpm/tpm0")) -> Item:
    """Without a TPM2 the data key sits on the same disk's ESP: encrypted, but not against theft."""
    if not _dm_crypt(config.data_dir):
        return Item("tpm", "skip", "data not on the appliance's encrypted partition: TPM2 not checked")
    if tpm.exists():
        return Item("tpm", "pass", "TPM2 present: the data partition unlocks only on this box (PCR 7)")
    return Item("tpm", "warn", "no TPM2: the data key is kept on the ESP, so a stolen disk is readable",
                "buy boxes with a TPM2 (most mini-PCs have an fTPM: enable it in the firmware), then re-provision")


def _run(*argv: str, timeout: float = 5.0) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def check_clock() -> Item:
    synced = _run("timedatectl", "show", "-p", "NTPSynchronized", "--value")
    if synced is not None and synced.strip() in ("yes", "no"):
        if synced.strip() == "yes":
            return Item("clock", "pass", "synchronised (timedatectl)")
        return Item("clock", "fail", "not synchronised (timedatectl)",
                    "check the uplink and NTP: `timedatectl timesync-status`; wrong clocks break TLS and study dates")
    tracking = _run("chronyc", "-n", "tracking")
    if tracking is not None:
        if "Leap status     : Normal" in tracking:
            return Item("clock", "pass", "synchronised (chrony)")
        return Item("clock", "fail", "chrony is not synchronised", "check the uplink and `chronyc sources`")
    return Item("clock", "warn", "unknown: neither timedatectl nor chrony answered",
                "install systemd-timesyncd or chrony (the appliance image has timesyncd)")


def check_services(config: EdgeConfig) -> Item:
    ports = {"dicom": (config.dicom.bind_address, config.dicom.port), "console": (config.console.bind_address, config.console.port)}
    down = [f"{name} (port {port})" for name, (addr, port) in ports.items() if not port_listening(addr, port)]
    if down:
        return Item("services", "fail", f"not listening: {', '.join(down)}",
                    "start the node: systemctl start edge.target (or edge run); then journalctl -u 'edge-*' for why it stopped")
    return Item("services", "pass", ", ".join(f"{n} on {p[1]}" for n, p in ports.items()) + " listening")


async def check_zeroconf(config: EdgeConfig) -> Item:
    if not config.ops.zeroconf:
        return Item("zeroconf", "skip", "switched off ([ops] zeroconf = false)")
    from edge.ops.discovery import DICOM_TYPE, discover

    try:
        found = await discover(config.ops.zeroconf_interfaces, timeout_s=2.0)
    except (OSError, ValueError) as exc:
        return Item("zeroconf", "fail", f"cannot browse: {exc}", "check [ops] zeroconf_interfaces")
    ours = [f for f in found if f.type == DICOM_TYPE and f.properties.get("node_id") == config.node.id]
    if not ours:
        return Item("zeroconf", "fail", "this node's _dicom._tcp record is not on the LAN",
                    "is the ops service running (systemctl status edge-ops)? check [ops] zeroconf_interfaces and the firewall (UDP 5353)")
    aet = ours[0].properties.get("aet")
    if aet != config.dicom.ae_title:
        return Item("zeroconf", "fail", f"announced aet={aet}, configured {config.dicom.ae_title}", "restart the ops service")
    return Item("zeroconf", "pass", f"_dicom._tcp announced as {ours[0].name} (aet={aet})")


async def check_heartbeat(config: EdgeConfig) -> Item:
    if not config.ops.pushgateway_url:
        return Item("heartbeat", "skip", "no Pushgateway configured ([ops] pushgateway_url)")
    from edge.ops.heartbeat import HeartbeatSetupError, make_handler, push
    from edge.ops.metrics import fleet_registry

    try:
        handler = make_handler(config)
        await asyncio.to_thread(push, config, fleet_registry(config), handler)
    except HeartbeatSetupError as exc:
        return Item("heartbeat", "fail", str(exc), "fix [ops] pushgateway_secrets_file / pushgateway_ca_bundle")
    except OSError as exc:
        return Item("heartbeat", "fail", f"push to {config.ops.pushgateway_url} failed: {exc}",
                    "check the uplink and the Pushgateway credentials; central ops will alert on this node")
    return Item("heartbeat", "pass", f"pushed to {config.ops.pushgateway_url} as node_id={config.node.id}")


async def run_doctor(config: EdgeConfig, config_path: str, parts: Sequence[Part] | None = None) -> list[Item]:
    """The node's own items first (config, disk, clock, ports), then each part's, in start order."""
    if parts is None:
        from edge.node.parts import PARTS_IN_ORDER

        parts = PARTS_IN_ORDER
    node_checks: list[Callable[[], Item]] = [
        lambda: check_config(config, config_path), lambda: check_disk(config), lambda: check_encryption(config),
        lambda: check_tpm(config), check_clock, lambda: check_services(config),
    ]
    items = [await asyncio.to_thread(check) for check in node_checks]
    for part in parts:
        for part_check in part.doctor_checks:
            items.append(await run_check(part_check, config))
    return items


async def run_check(check: DoctorCheck, config: EdgeConfig) -> Item:
    """A coroutine function on the loop; a plain one in a thread (it probes sockets, runs commands)."""
    if inspect.iscoroutinefunction(check):
        return await cast(Callable[[EdgeConfig], Awaitable[Item]], check)(config)
    return await asyncio.to_thread(cast(Callable[[EdgeConfig], Item], check), config)


def format_items(items: list[Item]) -> str:
    lines = []
    for item in items:  # details quote peers (the cloud's answer, a box's firmware): printable() for the terminal
        lines.append(f"{item.verdict.upper():5} {item.name:11} {printable(item.detail)}")
        if item.hint and item.verdict in ("fail", "warn"):
            lines.append(f"{'':17} fix: {printable(item.hint)}")
    counts = {v: sum(item.verdict == v for item in items) for v in ("fail", "pass", "warn", "skip")}
    lines.append(f"{counts['fail']} failed, {counts['pass']} passed, {counts['warn']} warnings, {counts['skip']} skipped")
    return "\n".join(lines)

