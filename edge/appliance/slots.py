"""Which slot is running, which version is where, and whether an update failed: for people.

Read from the kernel command line (``edge.slot=a|b``), the running root's
``/usr/lib/clinic-edge/version`` and the boot entries on the ESP (``/boot/efi``). The node's
services cannot read those under their sandbox (``ProcSubset=pid`` hides /proc/cmdline, the
ESP is root-only: it may hold the data key), so root writes what it found to
``/run/clinic-edge/slots.json`` (``python3 -m edge.appliance.slots --write``, at boot after
systemd-bless-boot, and ``edge update`` after an update) and :func:`slot_state` falls back
to that file. Off the appliance (no ``edge.slot`` and no state file) it is None.

Every path can be pointed elsewhere with an ``EDGE_*`` variable (see :class:`Appliance`),
as image/firstboot.sh does, so the tests need no VM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge.appliance.boot import (
    EntryName,
    check_slot,
    default_entry,
    other_slot,
    parse_entry_name,
)

STATE_FORMAT = 1


@dataclass(frozen=True)
class Appliance:
    """Where the appliance keeps things; each path overridable by its environment variable."""

    cmdline: Path = Path("/proc/cmdline")  # EDGE_CMDLINE
    esp: Path = Path("/boot/efi")  # EDGE_BOOT (as image/firstboot.sh)
    partitions: Path = Path("/dev/disk/by-partlabel")  # EDGE_PARTITIONS: root-a, root-b
    version_file: Path = Path("/usr/lib/clinic-edge/version")  # EDGE_VERSION_FILE: the running root's version
    state_file: Path = Path("/run/clinic-edge/slots.json")  # EDGE_SLOT_STATE: what root found, for the services
    root: Path = Path("/")  # EDGE_ROOT: the running root, so an update never writes over it

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Appliance:
        env = os.environ if env is None else env
        names = {"cmdline": "EDGE_CMDLINE", "esp": "EDGE_BOOT", "partitions": "EDGE_PARTITIONS",
                 "version_file": "EDGE_VERSION_FILE", "state_file": "EDGE_SLOT_STATE", "root": "EDGE_ROOT"}
        return cls(**{key: Path(env[var]) for key, var in names.items() if env.get(var)})

    @property
    def entries_dir(self) -> Path:
        return self.esp / "loader" / "entries"

    def slot_dir(self, slot: str) -> Path:
        """The slot's kernel, initrd and manifest on the ESP."""
        check_slot(slot)
        return self.esp / "clinic-edge" / slot

    def partition(self, slot: str) -> Path:
        check_slot(slot)
        return self.partitions / f"root-{slot}"


def running_slot(appliance: Appliance) -> str | None:
    """``edge.slot`` from the kernel command line (the last one counts, as the kernel's own
    options do); None off the appliance or where /proc/cmdline cannot be read."""
    try:
        words = appliance.cmdline.read_text().split()
    except OSError:
        return None
    slots = [w.split("=", 1)[1] for w in words if w.startswith("edge.slot=")]
    return slots[-1] if slots and slots[-1] in ("a", "b") else None


@dataclass(frozen=True)
class Update:
    """An update that is not (yet) the running slot's good entry: failed, waiting, or on trial."""

    state: str
    """"failed": its tries are used up and the old slot runs; "pending": it boots next;
    "trial": it is running but not yet marked good (boot-complete.target not reached)."""
    slot: str
    version: str | None
    entry: str
    tries_left: int
    tries_done: int


@dataclass(frozen=True)
class SlotState:
    """What ``edge status``, /healthz and the heartbeat say about the slots."""

    running_slot: str
    running_version: str | None
    other_slot: str
    other_version: str | None
    update: Update | None = None
    next_boot: str | None = None
    """The slot systemd-boot boots next by its own order (None: entries unknown)."""
    entries: tuple[str, ...] = ()
    source: str = "esp"
    """"esp" (read now), "state-file" (what root last wrote) or "cmdline" (the ESP unreadable)."""
    notes: tuple[str, ...] = field(default=())

    @property
    def failed(self) -> bool:
        return self.update is not None and self.update.state == "failed"

    @property
    def summary(self) -> str:
        """One line for people: "update to 0.2.0 failed (slot b, 3 tries); running 0.1.0 in slot a"."""
        running = f"running {self.running_version or 'unknown version'} in slot {self.running_slot}"
        u = self.update
        if u is None:
            other = f"; slot {self.other_slot} holds {self.other_version}" if self.other_version else ""
            return running + other
        version = u.version or "?"
        if u.state == "failed":
            return f"update to {version} failed (slot {u.slot}, {u.tries_done} tries); {running}"
        if u.state == "pending":
            return f"update to {version} waits in slot {u.slot} ({u.tries_left} tries), boots next; {running}"
        return f"{running} on trial: not yet marked good ({u.tries_left} tries left after this one)"

    def as_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["entries"] = list(self.entries)
        body["notes"] = list(self.notes)
        body["summary"] = self.summary
        body["failed"] = self.failed
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any], source: str) -> SlotState:
        update = body.get("update")
        return cls(
            running_slot=str(body["running_slot"]),
            running_version=body.get("running_version"),
            other_slot=str(body["other_slot"]),
            other_version=body.get("other_version"),
            update=Update(**{k: update[k] for k in ("state", "slot", "version", "entry", "tries_left", "tries_done")})
            if update else None,
            next_boot=body.get("next_boot"),
            entries=tuple(body.get("entries") or ()),
            source=source,
            notes=tuple(body.get("notes") or ()),
        )


def _read_line(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return text.splitlines()[0] if text else None


def entry_names(appliance: Appliance) -> list[EntryName]:
    """Our entries on the ESP (other files there are left alone). Raises OSError if unreadable."""
    found = []
    for path in sorted(appliance.entries_dir.iterdir()):
        name = parse_entry_name(path.name)
        if name is not None and path.is_file():
            found.append(name)
    return found


def entry_version(appliance: Appliance, name: EntryName) -> str | None:
    """The ``version`` line of an entry, else the slot's manifest on the ESP."""
    try:
        for line in (appliance.entries_dir / name.filename).read_text(errors="replace").splitlines():
            key, _, value = line.strip().partition(" ")
            if key == "version" and value.strip():
                return value.strip()
    except OSError:
        pass
    return slot_manifest_version(appliance, name.slot)


def slot_manifest_version(appliance: Appliance, slot: str) -> str | None:
    try:
        version = json.loads((appliance.slot_dir(slot) / "manifest.json").read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) else None


def read_slot_state(appliance: Appliance, slot: str) -> SlotState:
    """The state from the sources themselves (needs root on the appliance for the ESP)."""
    other = other_slot(slot)
    running_version = _read_line(appliance.version_file)
    try:
        names = entry_names(appliance)
    except OSError as exc:
        return SlotState(slot, running_version, other, slot_manifest_version(appliance, other), source="cmdline",
                         notes=(f"boot entries unreadable: {exc.strerror or exc}",))
    mine = [n for n in names if n.slot == slot]
    theirs = sorted((n for n in names if n.slot == other), key=lambda n: n.generation)
    update: Update | None = None
    counting_mine = [n for n in mine if n.counting]
    if counting_mine:  # this boot is the update being tried (systemd-bless-boot has not blessed it yet)
        n = max(counting_mine, key=lambda n: n.generation)
        update = Update("trial", slot, running_version, n.filename, n.tries_left or 0, n.tries_done or 0)
    elif theirs and theirs[-1].counting:
        n = theirs[-1]
        state = "failed" if n.tries_left == 0 else "pending"
        update = Update(state, other, entry_version(appliance, n), n.filename, n.tries_left or 0, n.tries_done or 0)
    other_version = entry_version(appliance, theirs[-1]) if theirs else slot_manifest_version(appliance, other)
    first = default_entry([n.filename for n in names])
    next_boot = parse_entry_name(first).slot if first else None  # type: ignore[union-attr]
    return SlotState(slot, running_version, other, other_version, update, next_boot,
                     tuple(n.filename for n in names), "esp")


def slot_state(appliance: Appliance | None = None) -> SlotState | None:
    """Running slot and version, the other slot's version, a failed or pending update; None off
    the appliance. Never raises: it is asked by /healthz and the heartbeat."""
    appliance = appliance or Appliance.from_env()
    slot = running_slot(appliance)
    if slot is not None:
        state = read_slot_state(appliance, slot)
        if state.source == "esp":
            return state
    saved = load_state(appliance.state_file)
    if saved is not None and (slot is None or saved.running_slot == slot):
        return saved
    return state if slot is not None else None


def load_state(path: Path) -> SlotState | None:
    try:
        body = json.loads(path.read_text())
        if body.get("format") != STATE_FORMAT:
            return None
        return SlotState.from_json(body, "state-file")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_state(state: SlotState, path: Path) -> None:
    """For the sandboxed services: temp + rename, world-readable (nothing secret in it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": STATE_FORMAT, **state.as_json()}, indent=2) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m edge.appliance.slots",
                                     description="print the slots' state (as root: from the ESP)")
    parser.add_argument("--write", action="store_true", help="also write it to the state file for the services (EDGE_SLOT_STATE)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    appliance = Appliance.from_env()
    state = slot_state(appliance)
    if state is None:
        print("not running on the appliance (no edge.slot= on the kernel command line)", file=sys.stderr)
        return 1
    if args.write and state.source == "esp":
        write_state(state, appliance.state_file)
    print(json.dumps(state.as_json(), indent=2) if args.json else state.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
