"""Every part of the node, by import (no names in strings), and the order they start in.

To add a package: give it a ``part.py`` with one ``PART`` (see edge.part) and list it here.
Its services then start in dependency order (``Part.after``) and stop in reverse, its tables
are migrated, its figures reach /metrics and the heartbeat, its checks run in ``edge doctor``
and its commands join ``edge``.
"""

from __future__ import annotations

from edge.config.sections import LoggingSection, NodeSection
from edge.console.part import PART as CONSOLE
from edge.dicom.part import PART as DICOM
from edge.ops.part import PART as OPS
from edge.orders.part import PART as ORDERS
from edge.part import Part, ServiceFactory, in_dependency_order
from edge.store.migrations import use_schemas
from edge.store.part import PART as STORE
from firmware_bridge.part import PART as BRIDGE
from kiosk.part import PART as KIOSK
from sync.part import PART as SYNC

NODE = Part(name="node", sections={"node": NodeSection, "logging": LoggingSection})
"""The roof's own sections: who the node is, and how every process logs."""

PARTS: tuple[Part, ...] = (NODE, STORE, ORDERS, DICOM, SYNC, BRIDGE, KIOSK, CONSOLE, OPS)
"""Listed in the order they start when ``after`` leaves a choice."""

PARTS_IN_ORDER: tuple[Part, ...] = in_dependency_order(PARTS)

SERVICES: tuple[ServiceFactory, ...] = tuple(service for part in PARTS_IN_ORDER for service in part.services)
SERVICE_NAMES: tuple[str, ...] = tuple(service.name for service in SERVICES)
"""Start order; stop is the reverse: dicom, sync, bridge, kiosk, console, ops (ops announces what listens)."""

# The store is the ground and cannot import the parts: tell it whose tables to migrate.
use_schemas([part.schema for part in PARTS_IN_ORDER if part.schema is not None])
