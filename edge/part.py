"""What a package of the node declares about itself, once: the Home Assistant manifest, in Python.

Every package (the store, orders, dicom, sync, kiosk, firmware_bridge, the console, ops) has
a ``part.py`` with one :class:`Part`: its edge.toml sections, its tables and migrations, its
fleet metrics, its ``edge doctor`` checks, its ``edge`` subcommands and its services. The
roof (``edge.node.parts``) lists them and starts their services in dependency order; nothing
else keeps a list of names. A part.py stays light (imports of its heavy modules go inside
the factories), so ``edge serve dicom`` does not load the kiosk's PDF renderer.

Ground: imports only the ground (the store, the service protocol) and libraries.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from pydantic import BaseModel

from edge.service import Service
from edge.store.migrations import Schema

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from edge.node.config import EdgeConfig
    from edge.store.spool import Spool

log = logging.getLogger(__name__)

Verdict = Literal["pass", "fail", "warn", "skip"]


@dataclass(frozen=True)
class DoctorItem:
    """One line of ``edge doctor``: what was asked, the verdict, and the fix when it failed."""

    name: str
    verdict: Verdict
    detail: str
    hint: str = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


DoctorCheck: TypeAlias = Callable[["EdgeConfig"], DoctorItem] | Callable[["EdgeConfig"], Awaitable[DoctorItem]]
"""A part's item for ``edge doctor``: a plain function runs in a thread, a coroutine function on the loop."""

FleetCollectorFactory: TypeAlias = Callable[["EdgeConfig"], "Collector"]
"""Store-derived figures for central ops (heartbeat, textfile, /metrics): the same from any process."""

AddCommands: TypeAlias = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
"""Adds a part's subcommands to the ``edge`` parser; each sets ``func(config, args) -> int``."""


class SyncWake:
    """Wake the uploader when something is kept: the sync service's own ``wake`` when it runs in
    this process, else the outbox bell that the sync process listens for."""

    def __init__(self, fallback: Callable[[], None] | None) -> None:
        self._target = fallback

    def attach(self, wake: Callable[[], None]) -> None:
        """The sync service, built in this process, takes the calls from now on."""
        self._target = wake

    def __call__(self) -> None:
        if self._target is not None:
            self._target()


@dataclass(frozen=True)
class NodeContext:
    """What a service factory is given: the config, the spool, and who else runs where."""

    config: EdgeConfig
    spool: Spool
    here: tuple[str, ...]
    """The services this process runs (``edge serve dicom sync``: dicom, sync)."""
    node: tuple[str, ...]
    """Every service of the node: ``here``, or all of them in a child of ``edge run``."""
    wake_sync: SyncWake
    make_room: Callable[[], object]
    """Retention on demand: evict what the cloud holds when a C-STORE or an ECG finds the disk short."""


@dataclass(frozen=True)
class ServiceFactory:
    """One service of a part, by the name ``edge serve NAME`` and the systemd unit use."""

    name: str
    build: Callable[[NodeContext], Service]


@dataclass(frozen=True, eq=False)
class Part:
    """One package of the node, declared once in its ``part.py`` (the same part is the same object)."""

    name: str
    after: tuple[str, ...] = ()
    """Parts whose services start before this one's (and whose tables are migrated first)."""
    sections: Mapping[str, type[BaseModel]] = field(default_factory=dict)
    """edge.toml section name -> its pydantic model (``EdgeConfig`` has each under that name)."""
    schema: Schema | None = None
    fleet_collectors: tuple[FleetCollectorFactory, ...] = ()
    doctor_checks: tuple[DoctorCheck, ...] = ()
    add_commands: AddCommands | None = None
    services: tuple[ServiceFactory, ...] = ()


class PartOrderError(Exception):
    """The parts cannot be put in order: a name in ``after`` is unknown, or they wait on each other."""


def in_dependency_order(parts: Sequence[Part]) -> tuple[Part, ...]:
    """Each part after those it names in ``after``; otherwise in the listed order (stable)."""
    by_name: dict[str, Part] = {}
    for part in parts:
        if part.name in by_name:
            raise PartOrderError(f"part {part.name!r} is declared twice")
        by_name[part.name] = part
    for part in parts:
        unknown = [name for name in part.after if name not in by_name]
        if unknown:
            raise PartOrderError(f"part {part.name!r} starts after unknown part(s): {', '.join(unknown)}")
    ordered: list[Part] = []
    done: set[str] = set()
    waiting = list(parts)
    while waiting:
        ready = next((p for p in waiting if all(name in done for name in p.after)), None)
        if ready is None:
            cycle = ", ".join(f"{p.name} (after {', '.join(n for n in p.after if n not in done)})" for p in waiting)
            raise PartOrderError(f"parts wait on each other: {cycle}")
        ordered.append(ready)
        done.add(ready.name)
        waiting.remove(ready)
    return tuple(ordered)
