"""The console's login as a stranger on the clinic LAN would try it, over real HTTP from two addresses.

127.0.0.1 is the technician's reception PC, 127.0.0.2 a stranger's phone (Linux routes all
of 127/8 to loopback, so one node sees two clients). A failed login must read the same for
a name that exists and one that does not; wrong guesses slow the guessing address only.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edge.store.db import open_database
from tests.conftest import EdgeNode, edge_cli
from tests.console.conftest import TECH, TECH_PASSWORD, console_node
from tests.edge.helpers import query

PC, PHONE = "127.0.0.1", "127.0.0.2"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_NOTICE = re.compile(r'<p class="notice error" role="status">([^<]*)</p>')


class LanClient:
    """A browser on one address of the LAN: its own cookies, its own source address."""

    def __init__(self, node: EdgeNode, source: str) -> None:
        self.base = f"http://127.0.0.1:{node.console_port}"
        self.source = source
        self.csrf = ""

    async def __aenter__(self) -> LanClient:
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(self.source, 0), limit=100),
            cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=aiohttp.ClientTimeout(total=60))
        async with self.http.get(self.base + "/login") as resp:
            self.csrf = _CSRF.search(await resp.text()).group(1)  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def login(self, user: str, password: str) -> tuple[int, str]:
        """(status, the error notice on the page, or the redirect target)."""
        async with self.http.post(self.base + "/login", data={"user": user, "password": password, "csrf": self.csrf},
                                  allow_redirects=False) as resp:
            text = await resp.text()
            if resp.status == 303:
                return 303, resp.headers["Location"]
            found = _NOTICE.search(text)
            return resp.status, found.group(1) if found else ""

    async def get(self, path: str) -> tuple[int, str, dict[str, str]]:
        async with self.http.get(self.base + path, allow_redirects=False) as resp:
            return resp.status, await resp.text(), dict(resp.headers)

    async def post(self, path: str, data: dict[str, str]) -> tuple[int, dict[str, str]]:
        async with self.http.post(self.base + path, data=data, allow_redirects=False) as resp:
            return resp.status, dict(resp.headers)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def fast_node(node_factory: Any) -> EdgeNode:
    """Delays start after 2 wrong logins (1 s, 2 s, 4 s …): the rules, quickly."""
    return console_node(node_factory, console={"max_login_failures": 2, "login_lockout_minutes": 1.0})


_WAIT = re.compile(r"wait (\d+) s")


async def slow_down(client: LanClient, name: str, until_wait_s: int = 4) -> list[tuple[int, str]]:
    """Guess wrong, waiting out each delay as a patient attacker would, until the pair must wait this long."""
    answers = []
    for i in range(8):
        answer = await client.login(name, f"guess-{i}")
        answers.append(answer)
        assert answer[0] == 401, answer  # each guess came after the last wait: evaluated
        found = _WAIT.search(answer[1])
        if found and int(found.group(1)) >= until_wait_s:
            return answers
        if found:
            await asyncio.sleep(int(found.group(1)) + 0.05)  # the delay under test, not a sync
    raise AssertionError(f"never slowed down to {until_wait_s} s: {answers}")


def test_an_unknown_name_and_a_wrong_password_read_the_same_and_are_slowed_the_same(fast_node: EdgeNode) -> None:
    async def scenario() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        async with LanClient(fast_node, PHONE) as phone:
            known = await slow_down(phone, TECH)
            known.append(await phone.login(TECH, "one-more"))
            unknown = await slow_down(phone, "nobody-here")
            unknown.append(await phone.login("nobody-here", "one-more"))
            return known, unknown

    known, unknown = _run(scenario())
    assert known == unknown  # same statuses, same words, try by try
    assert known[0] == (401, "Wrong user name or password.")
    assert known[1] == (401, "Wrong user name or password. Too many tries: wait 1 s, then try again.")
    assert known[3] == (401, "Wrong user name or password. Too many tries: wait 4 s, then try again.")
    assert known[4][0] == 429 and known[4][1].startswith("Too many tries: wait")  # not evaluated at all
    # The audit has every failure, whose name and why, never the password.
    rows = query(fast_node, "SELECT user, action, detail, client FROM order_audit WHERE action LIKE 'login%'")
    assert ("thandi", "login_failed", "wrong password", PHONE) in rows
    assert ("nobody-here", "login_failed", "unknown user", PHONE) in rows
    assert ("thandi", "login_failed", "wrong password; next try in 4 s", PHONE) in rows
    assert [r[0] for r in rows if r[1] == "login_throttled"] == ["thandi", "nobody-here"]
    assert not any("guess-" in str(r) or "one-more" in str(r) for r in rows)
    assert "guess-" not in fast_node.log_text()


def test_a_stranger_guessing_slows_only_the_stranger_and_unlock_ends_the_wait(fast_node: EdgeNode) -> None:
    async def scenario() -> dict[str, Any]:
        async with LanClient(fast_node, PHONE) as phone, LanClient(fast_node, PC) as pc:
            await slow_down(phone, TECH)
            seen: dict[str, Any] = {"phone_right_password": await phone.login(TECH, TECH_PASSWORD)}
            # The technician at the reception PC is not affected by the phone's guesses.
            seen["pc"] = await pc.login(TECH, TECH_PASSWORD)
            seen["pc_today"] = (await pc.get("/"))[0]
            seen["listed"] = await asyncio.to_thread(edge_cli, fast_node.config, "user", "list")
            seen["unlock"] = await asyncio.to_thread(edge_cli, fast_node.config, "user", "unlock", TECH)
            seen["phone_after_unlock"] = await phone.login(TECH, "guess-again")
            return seen

    seen = _run(scenario())
    status, text = seen["phone_right_password"]
    assert status == 429 and "Too many tries" in text  # not even the right password is checked while it waits
    assert seen["pc"] == (303, "/") and seen["pc_today"] == 200
    assert "wrong passwords from 1 address(es)" in seen["listed"].stdout
    assert "1 login delay(s) ended" in seen["unlock"].stdout
    assert seen["phone_after_unlock"] == (401, "Wrong user name or password.")


def test_fifty_concurrent_guesses_get_no_more_tries_than_the_rule_allows(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """50 threads on a real store, the clock held still: exactly the free tries are evaluated, no race."""
    import datetime as dt
    import threading

    from edge.console import accounts

    open_database(tmp_path / "var")
    accounts.add_user(TECH, "technician", TECH_PASSWORD)
    now = dt.datetime(2026, 3, 2, 8, 0, 0)
    monkeypatch.setattr(accounts, "utcnow", lambda: now)
    start = threading.Barrier(50)
    results: list[accounts.LoginResult] = []

    def guess(i: int) -> None:
        start.wait()
        results.append(accounts.log_in(TECH, f"guess-{i}", 3, 15, PHONE))

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 50
    assert sum(not r.wait_s for r in results) == 3 and sum(r.wait_s > 0 for r in results) == 47


def test_a_wrong_try_costs_one_scrypt_check_whether_the_name_exists_or_not(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from edge.console import accounts

    open_database(tmp_path / "var")
    accounts.add_user(TECH, "technician", TECH_PASSWORD)
    calls: list[tuple[int, int, int]] = []
    real = hashlib.scrypt

    def counting(password: bytes, *, salt: bytes, n: int, r: int, p: int, dklen: int = 64, **kw: Any) -> bytes:
        calls.append((n, r, p))
        return real(password, salt=salt, n=n, r=r, p=p, dklen=dklen, **kw)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    wrong = accounts.log_in(TECH, "not-it-at-all", 5, 15, PHONE)
    known_calls, calls[:] = list(calls), []
    unknown = accounts.log_in("nobody-here", "not-it-at-all", 5, 15, PHONE)
    assert known_calls == calls and len(calls) == 1  # the same work: one check at the same cost
    assert wrong.message == unknown.message == "Wrong user name or password."


def test_url_text_never_reaches_a_page_only_known_codes_do(cnode: EdgeNode) -> None:
    async def scenario() -> dict[str, Any]:
        async with LanClient(cnode, PC) as pc:
            assert (await pc.login(TECH, TECH_PASSWORD))[0] == 303
            today = (await pc.get("/"))[1]
            csrf = _CSRF.search(today).group(1)  # type: ignore[union-attr]
            return {
                "free_text": (await pc.get("/?error=Call+0800+123+456+now+-+node+compromised&msg=Hacked"))[1],
                "unknown_code": (await pc.get("/?error=not_a_code"))[1],
                "no_visit": await pc.post("/visits/999999/stat", {"csrf": csrf}),
                "known_code": (await pc.get("/?error=no_visit"))[1],
                "login_msg": (await pc.get("/login?msg=Your+session+ended.+Call+0800"))[1],
            }

    seen = _run(scenario())
    for page in (seen["free_text"], seen["unknown_code"], seen["login_msg"]):
        assert "0800" not in page and "Hacked" not in page and "not_a_code" not in page
        assert 'class="notice' not in page
    status, headers = seen["no_visit"]
    assert status == 303 and headers["Location"] == "/?error=no_visit"
    assert '<p class="notice error" role="status">That visit no longer exists.</p>' in seen["known_code"]
