"""Ops' Part: [ops], the heartbeat and zeroconf doctor items, ``edge doctor/provision/discover/
decommission`` and ``edge serve ops`` (heartbeat, textfile, zeroconf; started last)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from edge.ops.config import OpsSection
from edge.part import DoctorItem, NodeContext, Part, ServiceFactory
from edge.service import Service

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from edge.node.config import EdgeConfig


def build_ops(context: NodeContext) -> Service:
    from edge.ops.service import OpsService

    return OpsService(context.config)


async def check_heartbeat(config: EdgeConfig) -> DoctorItem:
    from edge.ops.doctor import check_heartbeat

    return await check_heartbeat(config)


async def check_zeroconf(config: EdgeConfig) -> DoctorItem:
    from edge.ops.doctor import check_zeroconf

    return await check_zeroconf(config)


def appliance_collector(config: EdgeConfig) -> Collector:
    """The slot and version running, a failed update: in the heartbeat, the textfile and /metrics."""
    from edge.ops.heartbeat import appliance_collector

    return appliance_collector(config)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """doctor, provision, discover, decommission, update."""
    from edge.ops.commands import add_commands as add_ops_commands

    add_ops_commands(sub)


PART = Part(
    name="ops",
    after=("dicom", "sync", "firmware_bridge", "kiosk", "console"),  # announces only what already listens
    sections={"ops": OpsSection},
    fleet_collectors=(appliance_collector,),
    doctor_checks=(check_heartbeat, check_zeroconf),
    add_commands=add_commands,
    services=(ServiceFactory("ops", build_ops),),
)
