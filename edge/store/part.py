"""The store's Part: the core tables (study, series, instance, outbox, event log) and [storage]."""

from __future__ import annotations

from edge.config.sections import StorageSection
from edge.part import Part
from edge.store import tables
from edge.store.migrations import Schema
from edge.store.models import CORE_TABLES

PART = Part(
    name="store",
    sections={"storage": StorageSection},
    schema=Schema("edge", tuple(CORE_TABLES), tables.MIGRATIONS),  # "edge": the name shipped nodes recorded
)
