"""One address guessing many user names is slowed as one guesser; the technician's PC is not.

Before: the delay counted per (name as typed, address), so a phone trying a new name each
time never waited at all. Now ``[console] login_address_failures`` wrong logins within
``login_address_window_minutes``, across every name, make that address wait (1 s, doubling).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from edge.store.db import open_database
from tests.conftest import EdgeNode
from tests.console.conftest import TECH, TECH_PASSWORD, console_node
from tests.console.test_login_delays import _WAIT, PC, PHONE, LanClient
from tests.edge.helpers import query

@pytest.fixture
def budget_node(node_factory: Any) -> EdgeNode:
    """Pairs wait after 5 wrong logins, an address after 2 across names."""
    return console_node(node_factory, console={"max_login_failures": 5, "login_lockout_minutes": 1.0,
                                               "login_address_failures": 2, "login_address_window_minutes": 15.0})


def test_a_phone_cycling_through_names_waits_and_the_reception_pc_does_not(budget_node: EdgeNode) -> None:
    async def scenario() -> dict[str, Any]:
        async with LanClient(budget_node, PHONE) as phone, LanClient(budget_node, PC) as pc:
            names = []
            for name in ("admin", "nurse", "sipho", "lerato"):  # a new name each time: no pair ever reaches 5
                names.append(await phone.login(name, "guess"))
                found = _WAIT.search(names[-1][1])
                if found and int(found.group(1)) < 4:
                    await asyncio.sleep(int(found.group(1)) + 0.05)  # the delay under test, not a sync
            seen: dict[str, Any] = {"names": names}
            seen["next_name"] = await phone.login("reception", "guess")  # before: 401, evaluated, no wait
            seen["right_password"] = await phone.login(TECH, TECH_PASSWORD)  # not even checked while it waits
            seen["pc"] = await pc.login(TECH, TECH_PASSWORD)
            return seen

    seen = asyncio.run(scenario())
    assert [text for _, text in seen["names"]] == [
        "Wrong user name or password.",
        "Wrong user name or password. Too many tries: wait 1 s, then try again.",  # the address's 2nd wrong login
        "Wrong user name or password. Too many tries: wait 2 s, then try again.",
        "Wrong user name or password. Too many tries: wait 4 s, then try again."]
    status, text = seen["next_name"]
    assert status == 429 and text.startswith("Too many tries: wait")
    assert seen["right_password"][0] == 429
    assert seen["pc"] == (303, "/")  # another address: unaffected
    rows = query(budget_node, "SELECT user, action, client FROM order_audit WHERE action = 'login_throttled'")
    assert rows == [("reception", "login_throttled", PHONE), (TECH, "login_throttled", PHONE)]


def test_the_address_budget_starts_again_after_its_window_and_a_right_login_is_forgiven(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edge.console import accounts

    open_database(tmp_path / "var")
    accounts.add_user(TECH, "technician", TECH_PASSWORD)
    now = [dt.datetime(2026, 3, 2, 8, 0, 0)]
    monkeypatch.setattr(accounts, "utcnow", lambda: now[0])
    budget = accounts.AddressBudget(failures=3, window_minutes=10)

    def guess(name: str, password: str = "wrong-guess") -> accounts.LoginResult:
        now[0] += dt.timedelta(milliseconds=100)
        return accounts.log_in(name, password, 5, 15, PHONE, budget)

    assert guess("a").message == guess("b").message == accounts.WRONG
    assert guess(TECH, TECH_PASSWORD).ok  # a right login forgives its own try, not the wrong ones before it
    assert guess("c").message.endswith("wait 1 s, then try again.")  # a, b, c: the 3rd wrong login, 3 names
    assert guess("d").wait_s > 0  # the address waits, whatever name it types
    assert accounts.log_in("e", "wrong-guess", 5, 15, PC, budget).message == accounts.WRONG  # the PC: its own budget

    now[0] += dt.timedelta(minutes=10)  # the window is over: the phone starts again from zero
    assert guess("f").message == accounts.WRONG and guess("g").message == accounts.WRONG
