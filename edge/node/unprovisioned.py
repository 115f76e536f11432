"""``edge serve unprovisioned``: what a card that was never set up does instead of the node.

On the appliance the node's config (/etc/clinic-edge/edge.toml) lives on the encrypted data
partition that first boot makes from edge-provision.toml. Without it the edge-*.service
units do not start (``ConditionPathExists=``) and this one runs instead, from the shipped
defaults only: it opens no store and writes nothing. It must still tell people what is wrong,
where each of them looks:

- the DR: every association is answered A-ASSOCIATE-RJ at once (rejected-permanent, by the
  service user, no reason given: the only honest code DICOM has for "this node cannot take
  anything"; "temporary congestion" would make the DR retry), and one log line per attempt
  names the calling AE, its address and the reason;
- the technician: the console's port shows a page in plain words, what is missing and the
  fix, and ``/healthz`` answers 503 with the reason;
- the field engineer at the box: the reason, printed once on start to the screen/serial
  console (the unit's ``StandardOutput=journal+console``).

The card's ESP is readable by root only (fstab ``umask=0077``: the provisioning file holds
the data key), so the unit hands firstboot-error.txt over as a systemd credential
(``$CREDENTIALS_DIRECTORY/firstboot-error``); run by hand, the file is read from
``$EDGE_BOOT`` (default /boot/efi, as image/firstboot.sh).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, cast

from aiohttp import web

from edge import sdnotify
from edge.http_server import HttpLimits, HttpListener, serve_app
from edge.service import BackgroundTasks, ServiceSetupError
from edge.terminal import printable
from edge.web import render, security_headers, setup_templates

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from edge.dicom.connections import AssociationServer
    from edge.dicom.slots import SlotTable
    from edge.node.config import EdgeConfig

log = logging.getLogger(__name__)

BOOT_ENV = "EDGE_BOOT"
DEFAULT_BOOT = Path("/boot/efi")
PROVISION_FILE = "edge-provision.toml"
FIRSTBOOT_ERROR_FILE = "firstboot-error.txt"
FIRSTBOOT_ERROR_CREDENTIAL = "firstboot-error"  # LoadCredential= in systemd/edge-unprovisioned.service
DATA_PARTITION = "edge-data"  # its GPT name (image/firstboot.sh)
SYS_BLOCK = Path("/sys/class/block")
ERROR_TEXT_CHARS = 4000  # firstboot.sh writes a few lines; a card is not a place for more
TEMPLATES = Path(__file__).with_name("templates")
CONSOLE_STATIC = Path(__file__).resolve().parent.parent / "console" / "static"  # the console's look, read-only

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-permanent, DICOM UL service-user, no-reason-given.
REJECT_PERMANENT, SOURCE_SERVICE_USER, NO_REASON_GIVEN = 0x01, 0x01, 0x01

PROVISION_COMMAND = ("edge provision --image-file CARD-OR-IMAGE --node-id … --name … --ae-title … "
                     "--cloud-url … --token -")


@dataclass(frozen=True)
class MissingSetup:
    """Why this box is not a node yet, in the words of the people who fix it."""

    headline: str
    """What the page says first: "This box is not set up yet"."""
    why: str
    """The cause, one line: "no edge-provision.toml was on its card"."""
    fix: tuple[str, ...]
    """What to do, step by step."""
    says: str = ""
    """The page's sentence under the headline ("" when ``details`` say it)."""
    details: str = ""
    """firstboot-error.txt as first boot wrote it (shown as it is, escaped)."""

    @property
    def reason(self) -> str:
        """The one line for the log, the console and /healthz."""
        return f"node not provisioned: {self.why}"


def _one_line(text: str, limit: int = 300) -> str:
    """A file's words on one printable line, for a log line and a DICOM peer's log."""
    flat = " ".join(printable(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _read_error(credentials_dir: Path | None, boot_dir: Path) -> str:
    """firstboot-error.txt: from the unit's credential (the ESP is root's), else from the card itself."""
    places = [boot_dir / FIRSTBOOT_ERROR_FILE]
    if credentials_dir is not None:
        places.insert(0, credentials_dir / FIRSTBOOT_ERROR_CREDENTIAL)
    for place in places:
        try:
            with place.open("rb") as file:
                text = file.read(ERROR_TEXT_CHARS).decode("utf-8", errors="replace").strip()
        except OSError:
            continue
        if text:  # the unit's SetCredential= default is empty: no error file on the card
            return text
    return ""


def _has_data_partition(sys_block: Path) -> bool:
    """Whether a partition named edge-data exists: first boot made it, so the box was set up once."""
    try:
        uevents = list(sys_block.glob("*/uevent"))
    except OSError:
        return False
    for uevent in uevents:
        try:
            if f"PARTNAME={DATA_PARTITION}" in uevent.read_text(errors="replace").splitlines():
                return True
        except OSError:
            continue
    return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # the ESP is root's: the sandboxed unit cannot even look
        return False


def find_missing_setup(
    boot_dir: Path | None = None, credentials_dir: Path | None = None, sys_block: Path = SYS_BLOCK
) -> MissingSetup:
    """What is missing, the most telling cause first: a failed first boot, an unapplied file,
    a data partition that did not open, or a card that was never provisioned."""
    if boot_dir is None:
        boot_dir = Path(os.environ.get(BOOT_ENV) or DEFAULT_BOOT)
    if credentials_dir is None and os.environ.get("CREDENTIALS_DIRECTORY"):
        credentials_dir = Path(os.environ["CREDENTIALS_DIRECTORY"])
    error = _read_error(credentials_dir, boot_dir)
    if error:
        return MissingSetup(
            headline="First boot failed",
            why=f"first boot failed: {_one_line(error)}",
            details=error,
            fix=(
                "Take the card out and put it in a laptop with Clinic Edge installed.",
                (f"Write a corrected provisioning file onto it: {PROVISION_COMMAND} "
                 "(the key named above is the one to fix)."),
                "Put the card back and restart the box; first boot runs again.",
            ),
        )
    if _exists(boot_dir / PROVISION_FILE):
        return MissingSetup(
            headline="First boot has not finished",
            why=f"{PROVISION_FILE} is on the card but first boot did not apply it",
            says=f"The provisioning file ({PROVISION_FILE}) is on its card, but first boot did not apply it.",
            fix=(
                "Restart the box once: first boot picks the file up again.",
                ("If this page comes back, the first-boot log says why: "
                 "journalctl -b -u edge-firstboot -u edge-provision (on the box's console)."),
            ),
        )
    if _has_data_partition(sys_block):
        return MissingSetup(
            headline="The box's data partition did not open",
            why="the data partition exists but was not opened (its key is missing or it is damaged)",
            says="It was set up once, but its data partition (settings and images) did not open.",
            fix=(
                "Restart the box once.",
                ("If this page comes back, the card's data partition cannot be unlocked here (a new "
                 "mainboard or TPM, or a damaged card): call support before re-provisioning, which "
                 "would make a new, empty data partition."),
            ),
        )
    return MissingSetup(
        headline="This box is not set up yet",
        why=f"no {PROVISION_FILE} was on its card",
        says=f"No provisioning file ({PROVISION_FILE}) was on its card: it does not know its clinic, "
             "its name or where to send images.",
        fix=(
            "Take the card out and put it in a laptop with Clinic Edge installed.",
            f"Write the clinic's provisioning file onto it: {PROVISION_COMMAND}",
            "Put the card back and restart the box; first boot sets it up (a few minutes).",
        ),
    )


# ---------------------------------------------------------------------- DICOM: refuse, say why


class RefusingDicom:
    """The DICOM port answers every association A-ASSOCIATE-RJ at once, with one log line each.

    The node's own server and slots (edge.dicom.connections) are reused: a stranger on the
    LAN gets the same PDU deadlines and limits here as on a working node.
    """

    name = "dicom"

    def __init__(self, config: EdgeConfig, missing: MissingSetup) -> None:
        self.config = config
        self.missing = missing
        self._server: AssociationServer | None = None
        self._slots: SlotTable | None = None

    async def start(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
        from pynetdicom.utils import make_target

        from edge.dicom import patches
        from edge.dicom.connections import AssociationServer, SlotRequestHandler
        from edge.dicom.const import ACSE_TIMEOUT_S
        from edge.dicom.modalities import ModalityDirectory
        from edge.dicom.slots import SlotTable

        patches.install()
        cfg = self.config.dicom
        self._slots = SlotTable(cfg.max_associations, cfg.max_associations_per_host, ModalityDirectory(cfg))
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = SlotTable.hard_limit_for(cfg.max_associations)
        ae.network_timeout = cfg.network_timeout_s
        ae.acse_timeout = min(cfg.network_timeout_s, ACSE_TIMEOUT_S)
        ae.add_supported_context(Verification)  # pynetdicom wants one; nothing is ever negotiated
        server = cast(AssociationServer, ae.make_server(
            (cfg.bind_address, cfg.port), evt_handlers=[(evt.EVT_REQUESTED, self._refuse)],
            server_class=AssociationServer, request_handler=SlotRequestHandler,
        ))
        server.setup_slots(self._slots, first_pdu_s=ae.acse_timeout, pdu_s=cfg.network_timeout_s,
                           max_pdu_bytes=cfg.max_pdu_bytes)
        thread = threading.Thread(target=make_target(server.serve_forever),
                                  name=f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}", daemon=True)
        thread.start()
        ae._servers.append(server)
        self._server = server
        log.info("%s on %s:%d refuses every association: %s", cfg.ae_title, cfg.bind_address, cfg.port,
                 self.missing.reason)

    def _refuse(self, event: Event) -> None:
        """A-ASSOCIATE-RJ before any negotiation, as the node refuses a stranger over its share."""
        from edge.dicom.connections import slot_of

        assoc = event.assoc
        request = assoc.requestor.primitive  # the A-ASSOCIATE-RQ: set before EVT_REQUESTED fires
        calling = str(request.calling_ae_title if request is not None else "").strip()
        called = str(request.called_ae_title if request is not None else "").strip()
        log.warning("association from %s (%s:%s) to %s refused: %s", printable(calling), assoc.requestor.address,
                    assoc.requestor.port, printable(called), self.missing.reason)
        assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, NO_REASON_GIVEN)
        slot = slot_of(assoc)
        if slot is not None and self._slots is not None:
            slot.ae_title = calling
            self._slots.ending(slot)
        assoc.kill()  # as pynetdicom's own rejection does: until the RJ is out and the peer has gone

    async def stop(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()
            self._server = None


# ---------------------------------------------------------------------- the console's port: the page


MISSING = web.AppKey("missing", MissingSetup)


async def page(request: web.Request) -> web.Response:
    """Any page a technician opens (a bookmark of /today too): what is missing and the fix."""
    missing = request.app[MISSING]
    return render("unprovisioned.html", request, status=503, missing=missing)


async def healthz(request: web.Request) -> web.Response:
    """503 with the reason: monitoring sees an unprovisioned box as down, and why."""
    missing = request.app[MISSING]
    return web.json_response({
        "status": "unprovisioned",
        "node_id": None,
        "reason": missing.reason,
        "checks": {"provisioned": {"ok": False, "critical": True, "detail": missing.reason}},
    }, status=503)


def make_page_app(missing: MissingSetup) -> web.Application:
    """The console's port on an unprovisioned box: one page, /healthz, the console's stylesheet."""
    app = web.Application(middlewares=[security_headers()])
    app[MISSING] = missing
    setup_templates(app, TEMPLATES)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static/", CONSOLE_STATIC)
    app.router.add_get("/{tail:.*}", page)
    return app


class SetupPage:
    """The page on [console] port (plain http: the console's certificate is on the data partition)."""

    name = "console"

    def __init__(self, config: EdgeConfig, missing: MissingSetup) -> None:
        self.config = config
        self.missing = missing
        self._listener: HttpListener | None = None

    async def start(self) -> None:
        cfg = self.config.console
        limits = HttpLimits(cfg.http_header_timeout_s, cfg.http_keepalive_s, cfg.http_max_connections)
        self._listener = await serve_app(make_page_app(self.missing), "unprovisioned", cfg.bind_address, cfg.port,
                                         limits)
        log.info("console: http://%s:%d says what is missing", cfg.bind_address, cfg.port)

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None


# ---------------------------------------------------------------------- the start mode


class UnprovisionedStartError(Exception):
    """A port could not be opened; the message says which."""


def announce(missing: MissingSetup, config: EdgeConfig) -> None:
    """Once, on stdout: the unit sends it to the box's screen and serial console."""
    print(f"Clinic Edge: {missing.reason}. DICOM is refused until the box is set up.", flush=True)
    steps = " ".join(f"{number}. {step}" for number, step in enumerate(missing.fix, start=1))
    print(f"Clinic Edge: to fix: {steps}", flush=True)
    print(f"Clinic Edge: the same on the console's web page, port {config.console.port}.", flush=True)


async def run_unprovisioned(config: EdgeConfig, stop: asyncio.Event | None = None,
                            missing: MissingSetup | None = None) -> None:
    """Refuse DICOM and show the page until SIGINT/SIGTERM (or ``stop``); READY=1 once both listen."""
    missing = missing or find_missing_setup()
    announce(missing, config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started: list[RefusingDicom | SetupPage] = []
    watchdog = BackgroundTasks("unprovisioned")
    try:
        for service in (RefusingDicom(config, missing), SetupPage(config, missing)):
            try:
                await service.start()
            except OSError as exc:
                raise UnprovisionedStartError(f"{service.name}: cannot start: {exc.strerror or exc}") from None
            except ServiceSetupError as exc:
                raise UnprovisionedStartError(f"{service.name}: cannot start: {exc}") from None
            started.append(service)
        sdnotify.notify("READY=1", f"STATUS={missing.reason}")
        watchdog_s = sdnotify.watchdog_interval_s()
        if watchdog_s is not None:
            watchdog.start(sdnotify.keep_watchdog_fed(watchdog_s), name="watchdog")
        await stop.wait()
        sdnotify.notify("STOPPING=1")
    finally:
        await watchdog.stop()
        for service in reversed(started):
            await service.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def serve_unprovisioned(config: EdgeConfig) -> int:
    """``edge serve unprovisioned``: 0 when stopped, 1 when a port could not be opened."""
    try:
        asyncio.run(run_unprovisioned(config))
    except UnprovisionedStartError as exc:
        log.error("%s", exc)
        return 1
    return 0


__all__ = ["MissingSetup", "find_missing_setup", "make_page_app", "run_unprovisioned", "serve_unprovisioned"]
