"""Who holds the node's DICOM association slots.

The clinic LAN is shared, so a stranger must not be able to hold the DR out:

- A slot is taken at TCP accept (``SlotTable.admit``, called by the server in
  edge.dicom.connections), before pynetdicom spends a thread or reads a byte, and given back
  when the association's thread ends.
- A stranger (an address that is no configured modality's) gets at most
  ``max_associations_per_host`` slots per address, and never the last free slot while a
  modality is configured; a modality that finds every slot taken closes the stranger that
  has gone longest without a complete PDU (a stalled one first).
- A refused stranger gets an A-ASSOCIATE-RJ (transient, local limit exceeded) and a close;
  refusals are logged at most once per ``REFUSAL_LOG_EVERY_S`` (``RefusalLog``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge.dicom.modalities import ModalityDirectory

log = logging.getLogger(__name__)

# A stranger is closed for a modality only when it has sent no complete PDU for this long:
# one streaming images sends several PDUs a second.
EVICT_IDLE_S = 5.0
REFUSAL_LOG_EVERY_S = 10.0


@dataclass(eq=False)
class Slot:
    """One accepted connection: from where, and how recently it completed a PDU."""

    address: str
    port: int
    stranger: bool
    sock: socket.socket
    opened_at: float = field(default_factory=time.monotonic)
    last_pdu_at: float = 0.0
    evicted: bool = False  # closed to make room for a modality
    timed_out: bool = False  # closed because a PDU missed its deadline
    gone: bool = False  # the connection is over (closed, reset or cut short)
    ending: bool = False  # released, aborted or rejected: closing, its thread about to end
    broken: bool = False  # a pynetdicom thread raised on the peer's bytes: ended by _end_broken
    ae_title: str = ""

    def __post_init__(self) -> None:
        self.last_pdu_at = self.opened_at

    @property
    def peer(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def live(self) -> bool:
        """Counts against the limits. A connection that is over or closing does not, though its
        thread may take a moment to end: the DR's next association must not wait for that."""
        return not (self.evicted or self.gone or self.ending)

    @property
    def closed_by_us(self) -> bool:
        """Already logged with its reason: pynetdicom's abort that follows needs no line of its own."""
        return self.evicted or self.timed_out or self.broken


@dataclass(frozen=True)
class SlotCounts:
    used: int
    max: int
    strangers: int
    accepting: bool  # a configured modality (with none configured: any peer) would get a slot now


class SlotTable:
    """The node's association slots; ``admit`` runs in the accept thread, the rest in association threads."""

    def __init__(self, max_total: int, per_host: int, directory: ModalityDirectory,
                 on_change: Callable[[], None] | None = None) -> None:
        self.max_total = max_total
        self.per_host = per_host
        self.directory = directory
        self.on_change = on_change
        self._slots: set[Slot] = set()
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        # Every connection with a thread, live or ending; pynetdicom refuses past its own
        # maximum_associations, which the service sets to this.
        self.hard_limit = self.hard_limit_for(max_total)

    @staticmethod
    def hard_limit_for(max_total: int) -> int:
        return 2 * max_total + 2

    @property
    def _kept_for_modalities(self) -> int:
        return 1 if self.directory.configured and self.max_total > 1 else 0

    def admit(self, sock: socket.socket, address: str, port: int) -> Slot | str:
        """A slot for this connection, or why not (in the clinic's words, for the log)."""
        stranger = not self.directory.is_modality_address(address)
        with self._lock:
            live = [s for s in self._slots if s.live]
            if len(self._slots) >= self.hard_limit:  # threads still ending: pynetdicom's own limit
                return f"{len(self._slots)} connections still closing"
            if stranger:
                # One more than the share while the request has not arrived: the peer's last
                # connection may be closing this very moment. confirm() holds it to the share.
                if sum(1 for s in live if s.address == address) >= self.per_host + 1:
                    return f"{self.per_host} association(s) already open from this address (max_associations_per_host)"
                if len(live) >= self.max_total:
                    return f"all {self.max_total} associations in use"
                if sum(1 for s in live if s.stranger) >= self.max_total - self._kept_for_modalities:
                    return "the last free association is kept for the clinic's modalities"
            elif len(live) >= self.max_total:
                victim = self._idlest_stranger(live)
                if victim is None:
                    return f"all {self.max_total} associations in use by the clinic's modalities or busy peers"
                self._evict(victim, address)
            slot = Slot(address, port, stranger, sock)
            self._slots.add(slot)
        self._changed()
        return slot

    def confirm(self, slot: Slot, is_modality: bool, wait_s: float = 1.0) -> bool:
        """When the A-ASSOCIATE-RQ has arrived (AE title known): may it have its association?

        A modality's address calling with another AE title is a stranger. A stranger over its
        share waits up to ``wait_s`` (in its own thread) for one of its earlier connections
        to finish closing; False: refuse it.
        """
        if not slot.stranger and is_modality:
            return True
        deadline = time.monotonic() + wait_s
        with self._freed:
            slot.stranger = True
            while True:
                others = [s for s in self._slots if s.live and s is not slot and s.stranger]
                if (sum(1 for s in others if s.address == slot.address) < self.per_host
                        and len(others) < self.max_total - self._kept_for_modalities):
                    fits = True
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    fits = False
                    break
                self._freed.wait(remaining)
        self._changed()
        return fits

    def release(self, slot: Slot) -> None:
        """Give the slot back when the association's thread ends (again is harmless)."""
        with self._freed:
            if slot not in self._slots:
                return
            self._slots.discard(slot)
            self._freed.notify_all()
        self._changed()

    def ending(self, slot: Slot) -> None:
        """The association is over (released, aborted, rejected, connection closed): it no longer counts."""
        with self._freed:
            slot.ending = True
            self._freed.notify_all()
        self._changed()

    def counts(self) -> SlotCounts:
        with self._lock:
            live = [s for s in self._slots if s.live]
            strangers = sum(1 for s in live if s.stranger)
            accepting = len(live) < self.max_total or (
                self.directory.configured and self._idlest_stranger(live) is not None
            )
        return SlotCounts(len(live), self.max_total, strangers, accepting)

    def _idlest_stranger(self, live: list[Slot]) -> Slot | None:
        now = time.monotonic()
        idle = [s for s in live if s.stranger and now - s.last_pdu_at >= EVICT_IDLE_S]
        return min(idle, key=lambda s: s.last_pdu_at, default=None)

    def _evict(self, victim: Slot, for_address: str) -> None:
        victim.evicted = True
        log.warning("closed the connection from %s (idle %.0f s) to make room for the modality at %s",
                    victim.peer, time.monotonic() - victim.last_pdu_at, for_address)
        with contextlib.suppress(OSError):  # its association thread sees the close and gives the slot back
            victim.sock.shutdown(socket.SHUT_RDWR)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


class RefusalLog:
    """One line per refused connection would let a stranger fill the log: at most one per interval."""

    def __init__(self, every_s: float = REFUSAL_LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._last = float("-inf")
        self._quiet = 0
        self._lock = threading.Lock()

    def refused(self, peer: str, reason: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.every_s:
                self._quiet += 1
                return
            quiet, self._quiet, self._last = self._quiet, 0, now
        more = f" ({quiet} more refused in the last {self.every_s:.0f} s)" if quiet else ""
        log.warning("refused a connection from %s: %s%s", peer, reason, more)

