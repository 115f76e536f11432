"""The kiosk is no oracle: unknown codes read like wrong PINs, bursts and rotating addresses gain nothing,
and only the kiosk's own screen is served."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

import kiosk.tickets
from edge.check_digit import luhn_digit
from edge.config import ConfigError
from edge.node.config import parse_config
from edge.secret_hash import secret_matches
from edge.store.db import open_database
from kiosk.app import NOT_THIS_SCREEN, screen_only
from kiosk.tables import KioskAudit, PinGuard
from kiosk.tickets import GuardSettings, issue_ticket, look_up
from tests.kiosk.conftest import issue
from tests.kiosk.helpers import audit


def unknown_code(n: int = 0) -> str:
    """A code with a valid check digit that no slip was given (issued codes are random; 1 in 1e9)."""
    body = f"{900000000 + n:09d}"
    return body + luhn_digit(body)


def jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)  # the kiosk is reached by IP address: keep its cookie


async def enter(http: aiohttp.ClientSession, url: str, code: str) -> None:
    """Language, then the slip code: the session now waits for a PIN."""
    async with http.post(url + "/language", data={"lang": "en"}, allow_redirects=False) as answer:
        assert answer.status == 303
    async with http.post(url + "/code", data={"code": code}, allow_redirects=False) as answer:
        assert answer.headers["Location"] == "/pin"


async def try_pin(http: aiohttp.ClientSession, url: str, code: str, pin: str) -> tuple[str, str]:
    """(the page the kiosk sends the patient to, the notice it shows there) for one try on a fresh screen."""
    http.cookie_jar.clear()
    await enter(http, url, code)
    async with http.post(url + "/pin", data={"pin": pin}, allow_redirects=False) as answer:
        where = answer.headers["Location"]
    async with http.get(url + where) as page:
        html = await page.text()
    notice = re.search(r'role="status">.*?<span>(.*?)</span>', html)
    assert notice is not None, html
    return where, notice.group(1)


def test_an_unknown_code_reads_exactly_like_a_real_code_with_a_wrong_pin(kiosk_factory: Any) -> None:
    node = kiosk_factory(max_pin_failures=3, lockout_minutes=15)
    real = issue(node.data_dir, "ACC-O1", "Lindiwe Mabaso")
    node.start()

    async def walk(code: str) -> list[tuple[str, str]]:
        async with aiohttp.ClientSession(cookie_jar=jar()) as http:
            return [await try_pin(http, node.url, code, "000000") for _ in range(4)]

    seen_real = asyncio.run(walk(real.code))
    seen_unknown = asyncio.run(walk(unknown_code()))
    assert seen_real == seen_unknown
    wrong = "The slip number or the PIN is not right. Please check your slip and try again, or ask at reception."
    locked = "Too many wrong tries. Please ask at reception, or try again in 15 minutes."
    assert seen_real == [("/pin", f"{wrong} Tries left: 2"), ("/pin", f"{wrong} Tries left: 1"),
                         ("/message", locked), ("/message", locked)]

    # Staff still tell them apart in the audit; /metrics (which ops scrape) does not.
    outcomes = [(e["code"], e["outcome"]) for e in reversed(audit(node)) if e["action"] == "lookup"]
    assert outcomes == [(real.code, "wrong_pin")] * 3 + [(real.code, "locked")] + \
        [(unknown_code(), "unknown_code")] * 3 + [(unknown_code(), "locked")]
    metrics = asyncio.run(_get_text(node.url + "/metrics"))
    assert 'edge_kiosk_lookups_total{outcome="wrong_pin"} 4.0' in metrics
    assert 'edge_kiosk_lookups_total{outcome="locked"} 4.0' in metrics
    assert "unknown_code" not in metrics
    assert real.code not in node.log_text() and unknown_code() not in node.log_text()


async def _get_text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as answer:
        return await answer.text()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    data_dir = tmp_path / "var"
    open_database(data_dir)
    return data_dir


@pytest.fixture
def pin_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every stored hash a PIN was checked against (the check itself still runs)."""
    checked: list[str] = []
    lock = threading.Lock()

    def spy(pin: str, stored: str) -> bool:
        with lock:
            checked.append(stored)
        return secret_matches(pin, stored)

    monkeypatch.setattr(kiosk.tickets, "secret_matches", spy)
    return checked


def test_an_unknown_code_costs_the_same_scrypt_check_as_a_real_one(store: Path, pin_checks: list[str]) -> None:
    real = issue_ticket("ACC-S1", "Lindiwe Mabaso", "Chest X-ray")
    rules = GuardSettings()
    assert look_up(real.code, "000000", "127.0.0.1", rules, store).tries_left == 4
    assert look_up(unknown_code(), "000000", "127.0.0.1", rules, store).tries_left == 4
    assert len(pin_checks) == 2
    cost = [stored.split("$")[:4] for stored in pin_checks]  # scrypt, N, r, p
    assert cost[0] == cost[1] == ["scrypt", "16384", "8", "1"]


def at_once(count: int, attempt: Callable[[int], Any]) -> list[Any]:
    """``attempt(i)`` in ``count`` threads released together."""
    start = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        start.wait()
        results[i] = attempt(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


@pytest.mark.parametrize("which", ["real code", "unknown code"])
def test_fifty_wrong_pins_at_once_get_exactly_max_pin_failures_checks(
    store: Path, pin_checks: list[str], which: str
) -> None:
    real = issue_ticket("ACC-C1", "Lindiwe Mabaso", "Chest X-ray")
    code = real.code if which == "real code" else unknown_code()
    rules = GuardSettings(max_pin_failures=5)
    results = at_once(50, lambda i: look_up(code, f"{i:06d}" if f"{i:06d}" != real.pin else "999999",
                                            f"10.0.0.{i}", rules, store))
    outcomes = sorted(r.outcome for r in results)
    assert len(pin_checks) == 5
    assert outcomes.count("wrong_pin") == 4 and outcomes.count("locked") == 46  # the fifth wrong one locks
    assert sorted(r.tries_left for r in results if r.outcome == "wrong_pin") == [1, 2, 3, 4]
    rows = [a.outcome for a in KioskAudit.select().where(KioskAudit.action == "lookup")]
    assert rows.count("wrong_pin" if which == "real code" else "unknown_code") == 5 and rows.count("locked") == 45
    assert "checking" not in rows
    assert look_up(code, real.pin, "10.0.0.99", rules, store).outcome == "locked"  # even the right PIN waits


def test_fifty_wrong_pins_at_once_over_http_to_the_kiosk_process(kiosk_factory: Any) -> None:
    """The kiosk in its own process, as under systemd: the counters hold across processes (SQLite's write lock)."""
    node = kiosk_factory(max_pin_failures=5)
    real = issue(node.data_dir, "ACC-H1", "Lindiwe Mabaso")
    node.start()

    async def burst() -> list[str]:
        sessions = [aiohttp.ClientSession(cookie_jar=jar()) for _ in range(50)]
        try:
            for http in sessions:
                await enter(http, node.url, real.code)

            async def one(http: aiohttp.ClientSession) -> str:
                async with http.post(node.url + "/pin", data={"pin": "000000"}, allow_redirects=False) as answer:
                    return str(answer.headers["Location"])

            return list(await asyncio.gather(*(one(http) for http in sessions)))
        finally:
            for http in sessions:
                await http.close()

    where = asyncio.run(burst())
    assert where.count("/pin") == 4 and where.count("/message") == 46  # 4 "tries left", then locked
    outcomes = [e["outcome"] for e in audit(node) if e["action"] == "lookup"]
    assert outcomes.count("wrong_pin") == 5  # PIN checked: exactly max_pin_failures
    assert len(outcomes) == 50 and set(outcomes) <= {"wrong_pin", "locked", "throttled"}


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> dt.datetime:
    """The lookup rules' clock stands still, so 'within 1 s of the last failure' holds however slow the box."""
    now = dt.datetime(2026, 11, 24, 9, 0, 0)
    monkeypatch.setattr(kiosk.tickets, "utcnow", lambda: now)
    return now


def test_rotating_addresses_do_not_escape_the_node_wide_budget(
    store: Path, pin_checks: list[str], frozen_clock: dt.datetime
) -> None:
    rules = GuardSettings(throttle_after_failures=3, throttle_node_failures=6)
    outcomes = [look_up(unknown_code(i), "000000", f"192.168.1.{i}", rules, store).outcome for i in range(1, 10)]
    assert outcomes == ["wrong_pin"] * 6 + ["throttled"] * 3  # every address new, the node's budget spent
    assert len(pin_checks) == 6


def test_fifty_addresses_at_once_get_exactly_the_node_budget_of_checks(
    store: Path, pin_checks: list[str], frozen_clock: dt.datetime
) -> None:
    rules = GuardSettings(throttle_after_failures=10, throttle_node_failures=30)
    results = at_once(50, lambda i: look_up(unknown_code(i), "000000", f"192.168.{i}.7", rules, store))
    outcomes = [r.outcome for r in results]
    assert outcomes.count("wrong_pin") == 30 and outcomes.count("throttled") == 20
    assert len(pin_checks) == 30
    assert all(0 < r.wait_s <= 1.0 for r in results if r.outcome == "throttled")


def test_codes_typed_and_never_issued_are_forgotten_after_a_quiet_day(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = GuardSettings(throttle_after_failures=1000, throttle_node_failures=1000)
    now = [dt.datetime(2026, 11, 24, 9, 0, 0)]
    monkeypatch.setattr(kiosk.tickets, "utcnow", lambda: now[0])
    for i in range(20):
        look_up(unknown_code(i), "000000", "127.0.0.1", rules, store)
    assert PinGuard.select().count() == 20
    now[0] += dt.timedelta(days=1, minutes=1)
    assert look_up(unknown_code(0), "000000", "127.0.0.1", rules, store).tries_left == 4  # a fresh count
    assert PinGuard.select().count() == 1


def test_allow_reprint_unlocks_a_locked_code(store: Path) -> None:
    real = issue_ticket("ACC-R1", "Lindiwe Mabaso", "Chest X-ray")
    rules = GuardSettings(max_pin_failures=2)
    for _ in range(2):
        look_up(real.code, "000000", "127.0.0.1", rules, store)
    assert look_up(real.code, real.pin, "127.0.0.1", rules, store).outcome == "locked"
    from kiosk.tickets import allow_reprint

    allow_reprint(real.code)
    assert look_up(real.code, real.pin, "127.0.0.1", rules, store).outcome == "not_ready"


# ---------------------------------------------------------------------- only the kiosk's own screen


async def _status(url: str, source: str, method: str = "GET") -> tuple[int, str]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector, cookie_jar=jar()) as http:
        async with http.request(method, url, allow_redirects=False) as answer:
            return answer.status, await answer.text()


def test_a_laptop_on_the_lan_gets_403_and_the_screen_is_served(kiosk_factory: Any) -> None:
    node = kiosk_factory(allowed_clients=["127.0.0.1"])
    node.start()
    for path, method in (("/", "GET"), ("/static/kiosk.css", "GET"), ("/metrics", "GET"), ("/pin", "POST"),
                         ("/no-such-page", "GET")):
        status, text = asyncio.run(_status(node.url + path, "127.0.0.2", method))
        assert (status, text) == (403, NOT_THIS_SCREEN), path
    assert asyncio.run(_status(node.url + "/", "127.0.0.1"))[0] == 200
    assert asyncio.run(_status(node.url + "/static/kiosk.css", "127.0.0.1"))[0] == 200
    log = node.log_text()
    assert "kiosk: refused GET '/' from 127.0.0.2: not in [kiosk] allowed_clients" in log
    assert "kiosk: refused POST '/pin' from 127.0.0.2" in log
    assert "from 127.0.0.1" not in log


def test_the_default_serves_a_screen_on_this_box_only(kiosk_factory: Any) -> None:
    """Default allowed_clients (loopback): the screen on the box gets its pages whatever bind_address says."""
    node = kiosk_factory()  # bound to 127.0.0.1 in tests; the shipped 0.0.0.0 applies the same rule
    node.start()
    assert asyncio.run(_status(node.url + "/", "127.0.0.1"))[0] == 200
    assert asyncio.run(_status(node.url + "/", "127.0.0.3"))[0] == 403


LOOPBACK = ["127.0.0.1", "::1"]


@pytest.mark.parametrize(("peer", "allowed", "status"), [
    (("::1", 4000, 0, 0), LOOPBACK, 200),
    (("127.0.0.1", 4000), LOOPBACK, 200),
    (("::ffff:127.0.0.1", 4000, 0, 0), LOOPBACK, 200),
    (("fe80::1%eth0", 4000, 0, 2), LOOPBACK, 403),
    (("10.0.0.9", 4000), LOOPBACK, 403),
    (("::ffff:127.0.0.1", 4000, 0, 0), ["127.0.0.1"], 200),  # IPv4 on a dual-stack socket
    (("::ffff:192.168.1.50", 4000, 0, 0), ["127.0.0.1"], 403),
    (("192.168.1.50", 4000), ["192.168.1.0/24"], 200),  # a screen elsewhere on the LAN, configured
    (("192.168.2.50", 4000), ["192.168.1.0/24"], 403),
])
def test_allowed_clients_reads_mapped_addresses_and_networks(
    peer: tuple[Any, ...], allowed: list[str], status: int
) -> None:
    async def check() -> int:
        async def handler(request: Any) -> aiohttp.web.Response:
            return aiohttp.web.Response(text="ok")

        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda name, default=None: peer if name == "peername" else default
        request = make_mocked_request("GET", "/", transport=transport)
        return (await screen_only(allowed)(request, handler)).status

    assert asyncio.run(check()) == status


@pytest.mark.parametrize("value", [[], ["kiosk-screen.local"], ["127.0.0.1", "300.1.1.1"]])
def test_a_bad_allowed_clients_value_names_the_key(value: list[str]) -> None:
    with pytest.raises(ConfigError, match=re.escape("[kiosk] allowed_clients")):
        parse_config({"kiosk": {"allowed_clients": value}}, Path("."))
