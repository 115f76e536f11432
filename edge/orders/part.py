"""The orders' Part: visits, orders and study matches (registered at the console, read by the DR's worklist)."""

from __future__ import annotations

from edge.orders import tables
from edge.part import Part
from edge.store.migrations import Schema

PART = Part(
    name="orders",
    after=("store",),
    schema=Schema(tables.SCHEMA_PACKAGE, tuple(tables.ORDER_TABLES), tables.MIGRATIONS),
)
