"""``edge doctor``: the field engineer's checklist, one pass/fail line per item with a fix.

Each item asks the real thing (a C-ECHO to the DR, a QIDO-RS to the cloud, a browse
for our own zeroconf record) rather than reading the config back, so a pass means it
works from this box now. ``warn`` and ``skip`` never fail the run; ``fail`` does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from edge.node.config import EdgeConfig
from edge.dicom.modalities import configured_modalities
from edge.ops.health import disk_free_bytes, port_listening
from edge.terminal import printable

log = logging.getLogger(__name__)

Verdict = Literal["pass", "fail", "warn", "skip"]
PROBE_UID = "2.25.1"  # a Study Instance UID nobody holds: QIDO proves reach and auth, returns no patient data


@dataclass(frozen=True)
class Item:
    name: str
    verdict: Verdict
    detail: str
    hint: str = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


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


def check_worklist(config: EdgeConfig) -> Item:
    """Who may read the worklist: closed until a modality (AE title and address) is configured."""
    cfg = config.dicom
    modalities = configured_modalities(cfg)
    if not modalities:
        return Item("worklist", "warn", "closed: no modality configured, so the DR cannot read the day's orders",
                    "set [dicom] modality_host to the DR's address and modality_ae to the AE title it calls with "
                    "(a second modality: other_modalities = [\"AE@host\"]), then restart")
    days = ("today" if not (cfg.worklist_days_back or cfg.worklist_days_ahead)
            else f"today -{cfg.worklist_days_back}/+{cfg.worklist_days_ahead} days")
    peers = ", ".join(f"{m.ae_title}@{m.host}" for m in modalities)
    return Item("worklist", "pass", f"answers only {peers}; {days}")


def check_calling_aets(config: EdgeConfig) -> Item:
    """C-STORE is open to any calling AE on a first run; say so until the clinic closes it."""
    allowed = config.dicom.allowed_calling_aets
    if not allowed:
        return Item("c-store", "warn", "any calling AE title may store images ([dicom] allowed_calling_aets is empty)",
                    f"set [dicom] allowed_calling_aets = [\"{config.dicom.modality_ae}\"] (the DR's AE title) "
                    "once the DR sends")
    return Item("c-store", "pass", f"only {', '.join(allowed)} may store images")


def check_dr(config: EdgeConfig) -> Item:
    """C-ECHO to the configured modality, with our own AE title as the caller."""
    cfg = config.dicom
    if not cfg.modality_host:
        return Item("dr", "skip", "no DR configured", "set [dicom] modality_host (and modality_ae, modality_port) or run edge provision")
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    target = f"{cfg.modality_ae}@{cfg.modality_host}:{cfg.modality_port}"
    ae = AE(ae_title=cfg.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate(cfg.modality_host, cfg.modality_port, ae_title=cfg.modality_ae)
    try:
        if assoc.is_rejected:
            return Item("dr", "fail", f"{target} rejected the association",
                        f"on the DR, add this node as a DICOM peer (AE {cfg.ae_title}); check [dicom] modality_ae matches the DR's AE title")
        if not assoc.is_established:
            return Item("dr", "fail", f"no DICOM answer from {target}",
                        "is the DR switched on and cabled? check [dicom] modality_host and modality_port (ping it)")
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        if code == 0x0000:
            return Item("dr", "pass", f"C-ECHO to {target}: success")
        return Item("dr", "fail", f"C-ECHO to {target} answered {code!r}", "the DR refused Verification; check its DICOM settings")
    finally:
        if assoc.is_established:
            assoc.release()


async def check_cloud(config: EdgeConfig) -> Item:
    """A QIDO-RS for a UID nobody holds: proves the link, TLS and the credentials."""
    from sync.cloud import CloudSetupError, load_auth_headers, open_session
    from sync.dicomweb import DicomWebClient, DicomWebError

    url = config.cloud.dicomweb_url
    try:
        headers = load_auth_headers(config.path(config.cloud.secrets_file))
        session = open_session(config)
    except CloudSetupError as exc:
        return Item("cloud", "fail", str(exc), "fix the secrets file (edge provision --token …) or the TLS files in [cloud]")
    try:
        await DicomWebClient(session, url, headers).find_instances(PROBE_UID, limit=1)
    except DicomWebError as exc:
        if exc.status in (401, 403):
            hint = "the cloud refused our credentials: get a new token and run edge provision --token …"
        elif exc.status is None:
            hint = "no answer: check the uplink (router, SIM credit) and [cloud] dicomweb_url"
        else:
            hint = "the cloud answered but not as DICOMweb: check [cloud] dicomweb_url (the DICOMweb root)"
        return Item("cloud", "fail", f"QIDO-RS to {url}: {exc}", hint)
    finally:
        await session.close()
    auth = "authenticated" if headers else "no credentials configured"
    return Item("cloud", "pass", f"QIDO-RS to {url}: answered ({auth})")


def check_boxes(config: EdgeConfig) -> Item:
    """Serial ECG boxes: every port listed in [bridge] present; skipped where the clinic has none."""
    bridge = getattr(config, "bridge", None)
    if bridge is None or not getattr(bridge, "enabled", True):
        return Item("boxes", "skip", "ECG bridge not enabled on this node")
    import glob

    listed = [str(p) for p in getattr(bridge, "ports", [])]
    pattern = str(getattr(bridge, "port_glob", "") or "")
    plugged = sorted(glob.glob(pattern)) if pattern else []
    if not listed and not plugged:
        return Item("boxes", "skip", f"no ECG box configured or plugged in ([bridge] ports empty, nothing at {pattern or '-'})")
    missing = [p for p in listed if not Path(p).exists()]
    if missing:
        return Item("boxes", "fail", f"serial port(s) missing: {', '.join(missing)}",
                    "plug the ECG box's USB cable in (and switch it on); check `ls /dev/serial/by-id/` against [bridge] ports")
    present = sorted(set(listed) | set(plugged))
    return Item("boxes", "pass", f"serial port(s) present: {', '.join(present)}")


_PRINTER_HINTS = {
    "offline": {
        "cups": "check the printer is on and cabled, then `lpstat -p {queue}`; cupsenable {queue} if disabled; "
                "the queue must exist (lpadmin -p {queue} -E -v … -m everywhere)",
        "escpos": "plug the receipt printer's USB cable in and switch it on ({device} must exist)",
    },
    "paper_out": {"cups": "load paper", "escpos": "load a new paper roll"},
}


def check_printer(config: EdgeConfig, require_kiosk: bool = True) -> Item:
    """The kiosk's own printer backend says whether it can print now (CUPS queue or ESC/POS device)."""
    k = config.kiosk
    if require_kiosk and not port_listening(k.bind_address, k.port):
        return Item("printer", "skip", "kiosk not running on this node: printer not checked")
    from kiosk.app import make_printer

    where = f"CUPS queue {k.cups_queue!r}" if k.printer == "cups" else f"ESC/POS printer at {k.escpos_device}"
    state = make_printer(config).state()
    if state == "ok":
        return Item("printer", "pass", f"{where} ready")
    if state == "job_failed":
        return Item("printer", "warn", f"{where}: the last print job failed", "check the printer, then print a test page")
    hint = _PRINTER_HINTS.get(state, {}).get(k.printer, "check the printer")
    return Item("printer", "fail", f"{where}: {state.replace('_', ' ')}",
                hint.format(queue=k.cups_queue, device=k.escpos_device))


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


async def run_doctor(config: EdgeConfig, config_path: str) -> list[Item]:
    """Every item, in the order an engineer would fix them."""
    sync_checks: list[Callable[[], Item]] = [
        lambda: check_config(config, config_path), lambda: check_disk(config), lambda: check_encryption(config),
        check_clock, lambda: check_services(config), lambda: check_dr(config), lambda: check_worklist(config),
        lambda: check_calling_aets(config),
    ]
    items = [await asyncio.to_thread(check) for check in sync_checks]
    async_checks: list[Callable[[], Awaitable[Item]]] = [
        lambda: check_cloud(config), lambda: check_heartbeat(config), lambda: check_zeroconf(config),
    ]
    for acheck in async_checks:
        items.append(await acheck())
    items += [check_boxes(config), await asyncio.to_thread(check_printer, config)]
    return items


def format_items(items: list[Item]) -> str:
    lines = []
    for item in items:  # details quote peers (the cloud's answer, a box's firmware): printable() for the terminal
        lines.append(f"{item.verdict.upper():5} {item.name:11} {printable(item.detail)}")
        if item.hint and item.verdict in ("fail", "warn"):
            lines.append(f"{'':17} fix: {printable(item.hint)}")
    counts = {v: sum(item.verdict == v for item in items) for v in ("fail", "pass", "warn", "skip")}
    lines.append(f"{counts['fail']} failed, {counts['pass']} passed, {counts['warn']} warnings, {counts['skip']} skipped")
    return "\n".join(lines)
