"""The kiosk's Part: [kiosk], its ticket, audit and PIN-guard tables, the printer doctor item,
``edge kiosk …`` and ``edge serve kiosk`` (the patient screen)."""

from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

from edge.part import NodeContext, Part, ServiceFactory
from edge.service import Service
from edge.store.migrations import Schema
from kiosk import tables
from kiosk.config import KioskSection
from kiosk.doctor import check_printer
from kiosk.printer_state import PrinterCollector

if TYPE_CHECKING:
    from edge.node.config import EdgeConfig
    from edge.part import DoctorItem


def check_film_link(config: EdgeConfig) -> DoctorItem:
    """kiosk.viewer_token's check, imported when edge doctor runs: every service imports this
    file, and the signing key's library (cryptography) costs seconds on the box's CPU."""
    from kiosk.viewer_token import check_film_link as check

    return check(config)


def build_kiosk(context: NodeContext) -> Service:
    from kiosk.app import KioskService

    return KioskService(context.config)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """kiosk allow-reprint, issue-ticket, audit."""
    from kiosk.cli import add_commands as add_kiosk_commands

    add_kiosk_commands(sub)


PART = Part(
    name="kiosk",
    after=("store", "orders", "sync"),  # prints the reports sync brings back, with the visit's second identifier
    sections={"kiosk": KioskSection},
    schema=Schema("kiosk", tuple(tables.KIOSK_TABLES), tables.MIGRATIONS),
    doctor_checks=(check_printer, check_film_link),
    fleet_collectors=(PrinterCollector,),  # the printer's cause in the heartbeat and on /metrics
    add_commands=add_commands,
    services=(ServiceFactory("kiosk", build_kiosk),),
)
