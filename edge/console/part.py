"""The console's Part: [console], its user and session tables, ``edge user …`` and ``edge serve console``."""

from __future__ import annotations

import argparse

from edge.config.sections import ConsoleSection
from edge.console import tables
from edge.part import NodeContext, Part, ServiceFactory
from edge.service import Service
from edge.store.migrations import Schema


def build_console(context: NodeContext) -> Service:
    """/healthz expects every other service of the node; "send now" and STAT wake the uploader."""
    from edge.console.app import ConsoleService

    if "dicom" not in context.here:  # the DICOM process writes its counters to a file: show those
        from edge.dicom.published_metrics import show_published_dicom_metrics

        show_published_dicom_metrics(context.config.data_dir)
    return ConsoleService(
        context.config, services=tuple(n for n in context.node if n != "console"), wake_sync=context.wake_sync,
    )


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """user add, list, unlock, passwd, disable, enable."""
    from edge.console.cli import add_commands as add_user_commands

    add_user_commands(sub)


PART = Part(
    name="console",
    after=("store", "orders", "dicom", "sync"),
    sections={"console": ConsoleSection},
    schema=Schema(tables.SCHEMA_PACKAGE, (*tables.CONSOLE_TABLES, tables.LoginDelay, tables.LoginAddressDelay),
                  tables.MIGRATIONS),
    add_commands=add_commands,
    services=(ServiceFactory("console", build_console),),
)
