"""Console accounts: scrypt password hashes, login delays after repeated failures, sessions.

The browser holds only a random token; the database keeps its SHA-256 and the session's
CSRF token.

Wrong logins slow the source, they never lock the account: failures count per (user
name as typed, client address), and after ``max_login_failures`` of them that pair waits
1 s, then 2, 4, … up to ``login_lockout_minutes`` before its next try is even evaluated.
A stranger guessing at the technician's name from a phone slows only the phone; the
technician at the reception PC logs in as usual. The count lives in the database (a
restart does not reset it, ``edge user unlock`` clears it from another process) and a
try is counted *before* its password is checked, in one write transaction, so fifty
concurrent guesses cannot all slip past the limit. An unknown name is counted, delayed,
checked (against a dummy hash) and answered exactly like a known one.

Besides each pair's count, an address has one budget across every name it types: after
``login_address_failures`` wrong logins within ``login_address_window_minutes`` the whole
address waits (1 s, 2, 4, … up to the same cap), so a phone cycling through names is
slowed as one guesser. Another address — the reception PC — is not affected; a PC the
stranger shares (one NAT address) is, which is why the budget is generous.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import re
import secrets
from dataclasses import dataclass

from peewee import fn

from edge.console.tables import ConsoleSession, ConsoleUser, LoginAddressDelay, LoginDelay
from edge.orders.tables import audit
from edge.secret_hash import DUMMY_HASH, hash_secret, secret_matches
from edge.store.db import write_transaction
from edge.store.models import utcnow
from edge.store.rows import rows
from edge.web import new_csrf_token

log = logging.getLogger(__name__)

ROLES = ("technician", "admin")
# scrypt at ~16 MiB and ~50 ms a check: affordable per login, costly per guess.
MIN_PASSWORD = 8
_USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
# A (user, address) pair with no wrong login for this long starts again from zero.
FORGET_AFTER = dt.timedelta(hours=24)
WRONG = "Wrong user name or password."


class AccountError(ValueError):
    """Shown to the admin or technician as it is (the CLI); the console shows its ``code``'s fixed text."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


def check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password must be at least {MIN_PASSWORD} characters", "short_password")


def add_user(name: str, role: str, password: str, by: str = "cli") -> ConsoleUser:
    name = name.strip().lower()
    if not _USER_NAME.match(name):
        raise AccountError("a user name is 1-32 lower-case letters, digits, '.', '_' or '-'", "bad_user_name")
    if role not in ROLES:
        raise AccountError(f"role must be one of: {', '.join(ROLES)}", "bad_role")
    check_new_password(password)
    hashed = hash_secret(password)
    with write_transaction():
        if ConsoleUser.get_or_none(ConsoleUser.name == name) is not None:
            raise AccountError(f"user {name!r} already exists", "user_exists")
        user = ConsoleUser.create(name=name, role=role, password_hash=hashed)
        audit(by, "user_added", detail=f"{name} ({role})")
    log.info("console: user %s added (%s) by %s", name, role, by)
    return user


def set_password(name: str, password: str, by: str = "cli") -> None:
    check_new_password(password)
    hashed = hash_secret(password)
    with write_transaction():
        n = ConsoleUser.update(password_hash=hashed).where(ConsoleUser.name == name).execute()
        if not n:
            raise AccountError(f"no user {name!r}", "no_user")
        LoginDelay.delete().where(LoginDelay.user_name == name).execute()
        ConsoleSession.delete().where(ConsoleSession.user.in_(
            ConsoleUser.select(ConsoleUser.id).where(ConsoleUser.name == name))).execute()
        audit(by, "password_set", detail=name)


def unlock_user(name: str, by: str = "cli") -> int:
    """End every login delay on the user's name (from any address); returns how many ended."""
    with write_transaction():
        if ConsoleUser.get_or_none(ConsoleUser.name == name) is None:
            raise AccountError(f"no user {name!r}", "no_user")
        ended = LoginDelay.delete().where(LoginDelay.user_name == name).execute()
        audit(by, "user_unlocked", detail=f"{name}: {ended} login delay(s) ended")
    log.info("console: login delays of user %s ended by %s (%d address(es))", name, by, ended)
    return int(ended)


def set_disabled(name: str, disabled: bool, by: str = "cli") -> None:
    with write_transaction():
        if not ConsoleUser.update(disabled=disabled).where(ConsoleUser.name == name).execute():
            raise AccountError(f"no user {name!r}", "no_user")
        if disabled:
            ConsoleSession.delete().where(ConsoleSession.user.in_(
                ConsoleUser.select(ConsoleUser.id).where(ConsoleUser.name == name))).execute()
        audit(by, "user_disabled" if disabled else "user_enabled", detail=name)


@dataclass(frozen=True)
class LoginResult:
    ok: bool
    message: str = ""
    user_id: int | None = None
    wait_s: int = 0  # > 0: the try was not evaluated, the pair must wait this long


def login_delay_s(failures: int, free_failures: int, max_delay_s: float) -> float:
    """Seconds a pair waits after ``failures`` wrong logins: none for the first few, then 1, 2, 4 … up to the cap."""
    if failures < free_failures:
        return 0.0
    return float(min(2.0 ** min(failures - free_failures, 30), max_delay_s))


def _wait_text(seconds: float) -> str:
    whole = max(1, math.ceil(seconds))
    return f"{whole} s" if whole < 120 else f"{math.ceil(whole / 60)} min"


@dataclass(frozen=True)
class AddressBudget:
    """``[console] login_address_failures`` within ``login_address_window_minutes``, across all names."""

    failures: int = 20
    window_minutes: float = 15.0


def _count_try(name: str, client: str, free_failures: int, max_delay_s: float,
               budget: AddressBudget = AddressBudget()) -> tuple[float, float]:
    """Count this try against the pair and the address before it is evaluated: (seconds still to wait, delay after this try).

    Wait > 0: refused without counting (the pair or the whole address must wait). Otherwise
    the try is counted as a failure of both now and forgiven if the password turns out
    right, so concurrent tries queue on this one transaction instead of all reading the
    same count.
    """
    now = utcnow()
    with write_transaction():
        LoginDelay.delete().where(LoginDelay.last_failure_at < now - FORGET_AFTER).execute()
        row = LoginDelay.get_or_none(LoginDelay.user_name == name, LoginDelay.client == client)
        address = LoginAddressDelay.get_or_none(LoginAddressDelay.client == client)
        waits = [r.next_try_at for r in (row, address) if r is not None and r.next_try_at > now]
        if waits:
            return (max(waits) - now).total_seconds(), 0.0
        failures = (row.failures if row is not None else 0) + 1
        delay = login_delay_s(failures, free_failures, max_delay_s)
        (LoginDelay.insert(user_name=name, client=client, failures=failures,
                           next_try_at=now + dt.timedelta(seconds=delay), last_failure_at=now)
         .on_conflict(conflict_target=[LoginDelay.user_name, LoginDelay.client],
                      update={LoginDelay.failures: failures, LoginDelay.next_try_at: now + dt.timedelta(seconds=delay),
                              LoginDelay.last_failure_at: now})
         .execute())
        window = dt.timedelta(minutes=budget.window_minutes)
        fresh = address is None or now - address.window_start >= window  # a new window: the count starts again
        address_failures = 1 if address is None or fresh else address.failures + 1
        address_delay = login_delay_s(address_failures, budget.failures, max_delay_s)
        (LoginAddressDelay.insert(client=client, failures=address_failures, window_start=now,
                                  next_try_at=now + dt.timedelta(seconds=address_delay))
         .on_conflict(conflict_target=[LoginAddressDelay.client],
                      update={LoginAddressDelay.failures: address_failures,
                              LoginAddressDelay.next_try_at: now + dt.timedelta(seconds=address_delay),
                              **({LoginAddressDelay.window_start: now} if fresh else {})})
         .execute())
    return 0.0, max(delay, address_delay)


def log_in(name: str, password: str, max_failures: int, max_delay_minutes: float, client: str,
           address_budget: AddressBudget = AddressBudget()) -> LoginResult:
    """Check a password under the per-(user, address) and per-address delays; audit every outcome (never the password).

    Unknown, disabled and wrong all read "Wrong user name or password." and cost one scrypt
    check each; a pair that must wait is answered at once, without a check, the same way
    whether the name exists or not.
    """
    name = name.strip().lower()[:64]
    client = client[:64]
    who = name or "?"
    wait, delay = _count_try(name, client, max_failures, max_delay_minutes * 60, address_budget)
    if wait > 0:
        with write_transaction():
            audit(who, "login_throttled", detail=f"tried again {wait:.0f} s too early", client=client)
        log.info("console: login try from %s refused: must wait %.0f s after wrong logins", client, wait)
        return LoginResult(False, f"Too many tries: wait {_wait_text(wait)}, then try again.", wait_s=math.ceil(wait))
    user = ConsoleUser.get_or_none(ConsoleUser.name == name)
    matches = secret_matches(password, user.password_hash if user is not None else DUMMY_HASH)
    if user is None or user.disabled or not matches:
        reason = "unknown user" if user is None else "disabled user" if user.disabled else "wrong password"
        with write_transaction():
            audit(who, "login_failed", detail=reason + (f"; next try in {delay:.0f} s" if delay else ""), client=client)
        log.info("console: login from %s failed: %s", client, reason)
        return LoginResult(False, WRONG + (f" Too many tries: wait {_wait_text(delay)}, then try again." if delay else ""))
    now = utcnow()
    with write_transaction():
        LoginDelay.delete().where(LoginDelay.user_name == name, LoginDelay.client == client).execute()
        # This try was counted against the address too: forgive it (only it; earlier wrong ones still count).
        LoginAddressDelay.update(failures=fn.MAX(LoginAddressDelay.failures - 1, 0)).where(
            LoginAddressDelay.client == client).execute()
        ConsoleUser.update(last_login_at=now).where(ConsoleUser.id == user.id).execute()
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
    token, csrf = secrets.token_urlsafe(32), new_csrf_token()
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


def no_users_yet() -> bool:
    """True until the first account exists: only then does the login page say how to make one."""
    return not ConsoleUser.select().exists()


def list_users() -> list[dict[str, object]]:
    """Users with role and state.

    ``wrong_login_addresses``: addresses with wrong logins on that name not yet followed by a
    right one (in the last day); each of them waits longer after its next wrong try.
    """
    since = utcnow() - FORGET_AFTER
    failing = dict(rows(
        LoginDelay.select(LoginDelay.user_name, fn.COUNT(LoginDelay.id))
        .where(LoginDelay.last_failure_at >= since).group_by(LoginDelay.user_name),
        tuple[str, int],
    ))
    return [
        {"name": u.name, "role": u.role, "disabled": u.disabled,
         "wrong_login_addresses": int(failing.get(u.name, 0)),
         "last_login": u.last_login_at.isoformat(timespec="seconds") + "Z" if u.last_login_at else None}
        for u in ConsoleUser.select().order_by(ConsoleUser.name)
    ]
