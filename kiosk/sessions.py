"""Kiosk sessions: what one patient's walk through the screens needs, held server-side.

The browser only holds a random cookie; nothing about the patient is in a URL or cookie.
A session idle longer than ``idle_timeout_s`` is forgotten, so the next person finds the
start screen and nothing of the last patient.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from kiosk.const import NotReady

COOKIE = "kiosk_session"


@dataclass
class KioskSession:
    id: str
    language: str
    last_seen: float = field(default_factory=time.monotonic)
    code: str = ""  # the slip code, between the code and the PIN screens
    ticket_id: int | None = None  # set once code + PIN matched
    estimate_hours: float | None = None  # report not ready yet
    wait: NotReady = "uploading"  # and why (kiosk.pages.not_ready_text)
    message: str = ""  # one-shot notice for the next screen (already translated)
    audit_id: int | None = None  # the print in progress
    job: str = ""
    study_uid: str = ""


class SessionStore:
    """In-process sessions keyed by a random cookie value."""

    def __init__(self, idle_timeout_s: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._sessions: dict[str, KioskSession] = {}

    def get(self, session_id: str | None) -> KioskSession | None:
        """The live session, or None when unknown or idle too long (then it is dropped)."""
        self._expire()
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is not None:
            session.last_seen = time.monotonic()
        return session

    def new(self, language: str) -> KioskSession:
        self._expire()
        session = KioskSession(id=secrets.token_urlsafe(24), language=language)
        self._sessions[session.id] = session
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.idle_timeout_s
        for key in [k for k, s in self._sessions.items() if s.last_seen < cutoff]:
            del self._sessions[key]

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)
