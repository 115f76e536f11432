"""Is the kiosk an oracle? Unknown code vs real code + wrong PIN (page and time), and a burst of wrong PINs.

Runs the real kiosk (`edge serve kiosk`) on loopback and talks to it as its screen does
(language, code, PIN), with a plain HTTP client:

1. the page a patient sees after an unknown code and after a real code with a wrong PIN
   (they must be the same text);
2. the time of the PIN step for each, over N tries (medians and their difference);
3. K wrong PINs at once against one real code: how many were evaluated (PIN checked)
   against the limit of ``max_pin_failures``, read from the kiosk's audit.

    .venv/bin/python bench/kiosk_oracle.py                # 40 tries each, a burst of 50
    .venv/bin/python bench/kiosk_oracle.py --tries 10 --burst 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from edge.check_digit import luhn_digit
from tests.kiosk.node import KioskNode, issue

UNKNOWN = "492914000" + luhn_digit("492914000")  # a valid check digit, never issued



async def _pin_step(http: aiohttp.ClientSession, url: str, code: str, pin: str) -> tuple[float, str]:
    """(seconds of the PIN POST, the text the next page shows) for one fresh kiosk session."""
    http.cookie_jar.clear()
    async with http.post(url + "/language", data={"lang": "en"}, allow_redirects=False):
        pass
    async with http.post(url + "/code", data={"code": code}, allow_redirects=False):
        pass
    started = time.perf_counter()
    async with http.post(url + "/pin", data={"pin": pin}, allow_redirects=False) as answer:
        elapsed = time.perf_counter() - started
        where = answer.headers.get("Location", "")
    async with http.get(url + where) as page:
        html = await page.text()
    notice = re.search(r'role="status">.*?<span>(.*?)</span>', html)
    return elapsed, notice.group(1) if notice else f"({where})"


async def _timing(node: KioskNode, real: list[str], tries: int) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        _, unknown_text = await _pin_step(http, node.url, UNKNOWN, "000000")
        _, wrong_text = await _pin_step(http, node.url, real[0], "000000")
        print(f"unknown code page:  {unknown_text!r}")
        print(f"wrong PIN page:     {wrong_text!r}")
        print(f"same page text:     {unknown_text == wrong_text}")
        unknown_s, wrong_s = [], []
        for i in range(tries):  # interleaved, so load on the box hits both alike
            unknown_s.append((await _pin_step(http, node.url, UNKNOWN, "000000"))[0])
            wrong_s.append((await _pin_step(http, node.url, real[1 + i % (len(real) - 1)], "000000"))[0])
    mu, mw = statistics.median(unknown_s) * 1000, statistics.median(wrong_s) * 1000
    print(f"PIN step, median of {tries}: unknown {mu:.1f} ms, wrong PIN {mw:.1f} ms, difference {mw - mu:+.1f} ms")


async def _burst(node: KioskNode, code: str, count: int) -> None:
    sessions = [aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) for _ in range(count)]
    try:
        for http in sessions:
            async with http.post(node.url + "/language", data={"lang": "en"}, allow_redirects=False):
                pass
            async with http.post(node.url + "/code", data={"code": code}, allow_redirects=False):
                pass

        async def one(http: aiohttp.ClientSession) -> None:
            async with http.post(node.url + "/pin", data={"pin": "000000"}, allow_redirects=False):
                pass

        await asyncio.gather(*(one(http) for http in sessions))
    finally:
        for http in sessions:
            await http.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=40)
    parser.add_argument("--burst", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-oracle-") as tmp:
        # Timing: limits out of the way, so every try reaches the PIN check.
        node = KioskNode(Path(tmp) / "timing", max_pin_failures=100, throttle_after_failures=1000,
                         **_node_budget(10000))
        real = [issue(node.data_dir, f"ACC-T{i}", "Bench Patient").code for i in range(1 + args.tries // 50 + 1)]
        node.start()
        try:
            asyncio.run(_timing(node, real, args.tries))
        finally:
            node.stop()

        node = KioskNode(Path(tmp) / "burst")  # shipped limits
        code = issue(node.data_dir, "ACC-B1", "Bench Patient").code
        node.start()
        try:
            asyncio.run(_burst(node, code, args.burst))
            audit = json.loads(node.cli("kiosk", "audit", "--json", "--limit", "1000").stdout)
        finally:
            node.stop()
        outcomes = [e["outcome"] for e in audit if e["action"] == "lookup"]
        evaluated = sum(o in ("wrong_pin", "unknown_code") for o in outcomes)
        refused = {o: outcomes.count(o) for o in sorted(set(outcomes))}
        print(f"{args.burst} wrong PINs at once on one code: {evaluated} evaluated (limit 5); outcomes {refused}")
    return 0


def _node_budget(value: int) -> dict[str, int]:
    """``throttle_node_failures`` when this kiosk has the key (the bench also runs on older ones)."""
    from edge.node.config import KioskSection

    return {"throttle_node_failures": value} if "throttle_node_failures" in KioskSection.model_fields else {}


if __name__ == "__main__":
    raise SystemExit(main())
