"""The bridge's Part: [bridge], the box and recording tables, the boxes on /metrics, the boxes
doctor item, the ``ecg-*`` commands and ``edge serve bridge`` (ECG boxes over serial).

pyserial and numpy load only when the service is built or a command runs.
"""

from __future__ import annotations

import argparse

from edge.part import NodeContext, Part, ServiceFactory
from edge.service import Service
from edge.store.migrations import Schema
from firmware_bridge import tables
from firmware_bridge.config import BridgeSection
from firmware_bridge.doctor import check_boxes
from firmware_bridge.metrics import BridgeCollector


def build_bridge(context: NodeContext) -> Service:
    """Idles when no port is configured or plugged in; a kept recording wakes the uploader."""
    from firmware_bridge.service import BridgeService

    wake_sync = context.wake_sync
    return BridgeService(
        context.config, context.spool, on_kept=lambda kept: wake_sync(),
        make_room=context.make_room,  # as for a C-STORE: evict what the cloud holds before refusing a recording
    )


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """ecg-sim, ecg-arm, ecg-firmware."""
    from firmware_bridge.cli import add_commands as add_ecg_commands

    add_ecg_commands(sub)


PART = Part(
    name="firmware_bridge",
    after=("store",),
    sections={"bridge": BridgeSection},
    schema=Schema("firmware_bridge", tuple(tables.BRIDGE_TABLES), tables.MIGRATIONS),
    fleet_collectors=(BridgeCollector,),
    doctor_checks=(check_boxes,),
    add_commands=add_commands,
    services=(ServiceFactory("bridge", build_bridge),),
)
