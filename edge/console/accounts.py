"""Console accounts: scrypt password hashes, lockout after repeated failures, login sessions.

The browser holds only a random token; the database keeps its SHA-256 and the session's
CSRF token. Failed logins count per account and lock it for a while, in the database,
so a restart does not reset the count.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass

from edge.console.tables import ConsoleSession, ConsoleUser
from edge.orders.tables import audit
from edge.secret_hash import DUMMY_HASH, hash_secret, secret_matches
from edge.store.db import write_transaction
from edge.store.models import utcnow

log = logging.getLogger(__name__)

ROLES = ("technician", "admin")
# scrypt at ~16 MiB and ~50 ms a check: affordable per login, costly per guess.
MIN_PASSWORD = 8
_USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")


class AccountError(ValueError):
    """Shown to the admin or technician as it is."""




def check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password must be at least {MIN_PASSWORD} characters")


def add_user(name: str, role: str, password: str, by: str = "cli") -> ConsoleUser:
    name = name.strip().lower()
    if not _USER_NAME.match(name):
        raise AccountError("a user name is 1-32 lower-case letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise AccountError(f"role must be one of: {', '.join(ROLES)}")
    check_new_password(password)
    hashed = hash_secret(password)
    with write_transaction():
        if ConsoleUser.get_or_none(ConsoleUser.name == name) is not None:
            raise AccountError(f"user {name!r} already exists")
        user = ConsoleUser.create(name=name, role=role, password_hash=hashed)
        audit(by, "user_added", detail=f"{name} ({role})")
    log.info("console: user %s added (%s) by %s", name, role, by)
    return user


def set_password(name: str, password: str, by: str = "cli") -> None:
    check_new_password(password)
    hashed = hash_secret(password)
    with write_transaction():
        n = ConsoleUser.update(password_hash=hashed, failed_logins=0, locked_until=None).where(
            ConsoleUser.name == name).execute()
        if not n:
            raise AccountError(f"no user {name!r}")
        ConsoleSession.delete().where(ConsoleSession.user.in_(
            ConsoleUser.select(ConsoleUser.id).where(ConsoleUser.name == name))).execute()
        audit(by, "password_set", detail=name)


def unlock_user(name: str, by: str = "cli") -> None:
    with write_transaction():
        if not ConsoleUser.update(failed_logins=0, locked_until=None).where(ConsoleUser.name == name).execute():
            raise AccountError(f"no user {name!r}")
        audit(by, "user_unlocked", detail=name)


def set_disabled(name: str, disabled: bool, by: str = "cli") -> None:
    with write_transaction():
        if not ConsoleUser.update(disabled=disabled).where(ConsoleUser.name == name).execute():
            raise AccountError(f"no user {name!r}")
        if disabled:
            ConsoleSession.delete().where(ConsoleSession.user.in_(
                ConsoleUser.select(ConsoleUser.id).where(ConsoleUser.name == name))).execute()
        audit(by, "user_disabled" if disabled else "user_enabled", detail=name)


@dataclass(frozen=True)
class LoginResult:
    ok: bool
    message: str = ""
    user_id: int | None = None


def log_in(name: str, password: str, max_failures: int, lockout_minutes: float, client: str) -> LoginResult:
    """Check a password under the lockout rule; audit every outcome (never the password)."""
    name = name.strip().lower()[:64]
    now = utcnow()
    user = ConsoleUser.get_or_none(ConsoleUser.name == name)
    if user is None or user.disabled:
        secret_matches(password, DUMMY_HASH)  # same time as a real check: no oracle for user names
        with write_transaction():
            audit(name or "?", "login_failed", detail="unknown or disabled user", client=client)
        log.info("console: login from %s failed: unknown or disabled user", client)
        return LoginResult(False, "Wrong user name or password.")
    if user.locked_until is not None and user.locked_until > now:
        minutes = max(1, round((user.locked_until - now).total_seconds() / 60))
        with write_transaction():
            audit(name, "login_locked", detail="account locked", client=client)
        return LoginResult(False, f"Too many wrong passwords: this account is locked for about {minutes} more "
                                  "minute(s). An admin can unlock it now.")
    if not secret_matches(password, user.password_hash):
        with write_transaction():
            failed = ConsoleUser.get_by_id(user.id).failed_logins + 1
            locked = failed >= max_failures
            ConsoleUser.update(
                failed_logins=0 if locked else failed,
                locked_until=now + dt.timedelta(minutes=lockout_minutes) if locked else None,
            ).where(ConsoleUser.id == user.id).execute()
            audit(name, "login_failed", detail="wrong password" + ("; account locked" if locked else ""), client=client)
        if locked:
            log.warning("console: user %s locked for %.0f min after %d wrong passwords (from %s)",
                        name, lockout_minutes, max_failures, client)
            return LoginResult(False, f"Too many wrong passwords: this account is locked for "
                                      f"{lockout_minutes:g} minutes. An admin can unlock it now.")
        log.info("console: login as %s from %s failed: wrong password", name, client)
        return LoginResult(False, "Wrong user name or password.")
    with write_transaction():
        ConsoleUser.update(failed_logins=0, locked_until=None, last_login_at=now).where(
            ConsoleUser.id == user.id).execute()
        audit(name, "login", client=client)
    log.info("console: %s logged in from %s", name, client)
    return LoginResult(True, user_id=user.id)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SessionInfo:
    session_id: int
    user: str
    role: str
    csrf: str


def new_session(user_id: int) -> tuple[str, SessionInfo]:
    """A fresh session (token for the cookie, CSRF token for the forms)."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    with write_transaction():
        row = ConsoleSession.create(token_hash=_token_hash(token), user=user_id, csrf=csrf)
        user = ConsoleUser.get_by_id(user_id)
    return token, SessionInfo(row.id, user.name, user.role, csrf)


# Touch last_seen at most this often: a poll every few seconds need not write each time.
_TOUCH_EVERY = dt.timedelta(seconds=60)


def session_for(token: str | None, idle_minutes: float) -> SessionInfo | None:
    """The live session for a cookie, or None (unknown, idle too long, user disabled)."""
    if not token or len(token) > 128:
        return None
    row = (
        ConsoleSession.select(ConsoleSession.id, ConsoleSession.csrf, ConsoleSession.last_seen,
                              ConsoleUser.name, ConsoleUser.role, ConsoleUser.disabled)
        .join(ConsoleUser)
        .where(ConsoleSession.token_hash == _token_hash(token))
        .tuples()
        .first()
    )
    if row is None:
        return None
    sid, csrf, last_seen, name, role, disabled = row
    now = utcnow()
    if disabled or now - last_seen > dt.timedelta(minutes=idle_minutes):
        end_session(token)
        return None
    if now - last_seen > _TOUCH_EVERY:
        with write_transaction():
            ConsoleSession.update(last_seen=now).where(ConsoleSession.id == sid).execute()
    return SessionInfo(sid, name, role, csrf)


def end_session(token: str | None) -> None:
    if token:
        with write_transaction():
            ConsoleSession.delete().where(ConsoleSession.token_hash == _token_hash(token)).execute()


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


def list_users() -> list[dict[str, object]]:
    now = utcnow()
    return [
        {"name": u.name, "role": u.role, "disabled": u.disabled,
         "locked": bool(u.locked_until and u.locked_until > now),
         "last_login": u.last_login_at.isoformat(timespec="seconds") + "Z" if u.last_login_at else None}
        for u in ConsoleUser.select().order_by(ConsoleUser.name)
    ]
