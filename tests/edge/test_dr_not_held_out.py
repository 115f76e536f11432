"""No stranger on the clinic LAN holds the DR out of the node, and health checks cost the DR nothing.

The DR is DCMTK echoscu calling as DR1 from 127.0.0.1, configured as the clinic's modality.
Strangers are raw sockets bound to other loopback addresses (127.0.0.2 …): each sends a
valid A-ASSOCIATE-RQ, waits for the node's answer, then one byte of the next PDU header and
nothing more — the stall that used to hold a slot until the stranger hung up.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

from tests.conftest import EdgeNode
from tests.edge.helpers import associate_rq, echo, echo_succeeds
from tests.waiting import wait_until

DR = {"modality_ae": "DR1", "modality_host": "127.0.0.1"}
VERIFICATION = "1.2.840.10008.1.1"


class Staller:
    """A stranger's connection from ``source``: associated (``accepted``), then stalled mid-header."""

    def __init__(self, node: EdgeNode, source: str, calling: str = "STRANGER") -> None:
        self.source = source
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.settimeout(20)
        self.sock.connect(("127.0.0.1", node.port))
        self.sock.sendall(associate_rq(node.ae_title, calling))
        answer = self._read_pdu_type()
        self.accepted = answer == 0x02  # A-ASSOCIATE-AC; a refusal is an RJ (0x03) or a close
        if self.accepted:
            self.sock.sendall(b"\x04")  # one byte of a P-DATA-TF header, and then silence

    def _read_pdu_type(self) -> int | None:
        try:
            head = self.sock.recv(1)
        except OSError:
            return None
        return head[0] if head else None

    def closed_by_node(self, timeout: float) -> bool:
        """True once the node has closed the connection (it may send an A-ABORT first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True  # reset
        return False

    def close(self) -> None:
        self.sock.close()


@contextmanager
def stallers(node: EdgeNode, sources: list[str], calling: str = "STRANGER") -> Iterator[list[Staller]]:
    opened: list[Staller] = []
    try:
        for source in sources:
            opened.append(Staller(node, source, calling))
        yield opened
    finally:
        for staller in opened:
            staller.close()


@contextmanager
def strangers_keep_trying(node: EdgeNode) -> Iterator[list[Staller]]:
    """A stranger that grabs every slot that comes free (the node's own start-up probe's, say), from fresh addresses."""
    opened: list[Staller] = []
    stop = threading.Event()

    def keep_trying() -> None:
        for i in itertools.count():
            if stop.wait(0.2):
                return
            with contextlib.suppress(OSError):
                opened.append(Staller(node, f"127.0.0.{21 + i % 30}"))

    thread = threading.Thread(target=keep_trying, daemon=True)
    thread.start()
    try:
        yield opened
    finally:
        stop.set()
        thread.join(30)
        for staller in opened:
            staller.close()


def seconds_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls until ``condition`` holds; returns how long it took (a figure, not a tight bound)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.5)
    return time.monotonic() - started


def healthz(node: EdgeNode) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.console_port}/healthz", timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def no_slot_held(node: EdgeNode) -> EdgeNode:
    """Wait until the DICOM service holds no slot: the start-up probe's connection (tests/node.py
    wait_for_port, from the DR's address) is gone, so a test counting slots counts only its own."""
    from edge.dicom import availability

    wait_until(lambda: (state := availability.read(node.data_dir)) is not None and state.slots_used == 0,
               30, "the start-up probe's slot given back")
    return node


def addresses(first: int, count: int) -> list[str]:
    return [f"127.0.0.{first + i}" for i in range(count)]


# --- (a) the DR gets in past any number of stalled strangers ---------------------------------


def test_dr_gets_in_past_stalled_strangers_from_many_addresses_and_one(node_factory: Any) -> None:
    node = node_factory(dicom=DR).start()
    # Every slot a stranger could take, from eight addresses, then twenty more from one address.
    with stallers(node, addresses(2, 8) + ["127.0.0.20"] * 6) as held, strangers_keep_trying(node) as more:
        took = seconds_until(lambda: echo_succeeds(node), 15, "the DR's C-ECHO past stalled strangers")
        accepted = [s for s in held + more if s.accepted]
        assert len(accepted) <= 7  # of max_associations = 8, one stays kept for the clinic's modality
        assert sum(1 for s in accepted if s.source == "127.0.0.20") <= 2  # max_associations_per_host
        assert all(not s.closed_by_node(0.1) for s in accepted)  # the DR got in without waiting for them to time out
    print(f"DR echo succeeded {took:.1f} s after {len(held) + len(more)} stalled connections ({len(accepted)} associated)")
    assert node.proc is not None and node.proc.poll() is None


def test_strangers_from_one_address_hold_at_most_their_share(node_factory: Any) -> None:
    node = node_factory().start()  # no modality configured: everyone is a stranger
    with stallers(node, ["127.0.0.30"] * 6) as held:
        assert sum(s.accepted for s in held) == 2
        assert echo_succeeds(node)  # from 127.0.0.1: another address, its own share
    assert "refused a connection from 127.0.0.30" in node.log_text()
    assert "max_associations_per_host" in node.log_text()


def test_a_stranger_calling_from_the_drs_address_gets_no_reserved_slot(node_factory: Any) -> None:
    node = no_slot_held(node_factory(dicom={**DR, "max_associations": 2}).start())
    with stallers(node, ["127.0.0.2"]) as first, stallers(node, ["127.0.0.1"], calling="NOT_THE_DR") as second:
        assert first[0].accepted  # the strangers' share: one of two
        assert not second[0].accepted  # the DR's address, but not the DR's AE title: no second stranger
        assert echo_succeeds(node)


def test_the_dr_closes_the_stalled_stranger_when_every_slot_is_held(node_factory: Any) -> None:
    # Two slots: one stranger (its share) and one stalled association from the DR itself.
    node = no_slot_held(node_factory(dicom={**DR, "max_associations": 2}).start())
    with stallers(node, ["127.0.0.2"]) as stranger:
        assert stranger[0].accepted
        # The DR's own stalled association takes the second slot. Under load a slot given back
        # late (the start-up probe's) can refuse the first try: the setup retries, the test does not.
        dr_stalled = Staller(node, "127.0.0.1", calling="DR1")
        deadline = time.monotonic() + 30
        while not dr_stalled.accepted and time.monotonic() < deadline:
            dr_stalled.close()
            time.sleep(0.5)
            dr_stalled = Staller(node, "127.0.0.1", calling="DR1")
        try:
            assert dr_stalled.accepted, "the DR's stalled association never got the second slot"
            seconds_until(lambda: echo_succeeds(node), 15, "the DR's C-ECHO with both slots held")
            assert stranger[0].closed_by_node(10)
        finally:
            dr_stalled.close()
    assert re.search(r"closed the connection from 127\.0\.0\.2:\d+ \(idle \d+ s\) to make room", node.log_text())


# --- (b) a stalled PDU has a deadline ----------------------------------------------------------


def test_stalled_connections_are_closed_after_their_deadline(node_factory: Any) -> None:
    node = node_factory(dicom={"network_timeout_s": 3.0}).start()
    half_request = socket.create_connection(("127.0.0.1", node.port), timeout=20)
    half_request.sendall(associate_rq(node.ae_title)[:40])  # the first PDU stops half-way
    with stallers(node, addresses(2, 3)) as held:
        assert all(s.accepted for s in held)
        for staller in held:
            assert staller.closed_by_node(30), f"the node kept the stalled connection from {staller.source}"
    half_request.settimeout(30)
    assert half_request.recv(100) == b""  # the half request was closed too
    half_request.close()
    seconds_until(lambda: echo_succeeds(node), 15, "C-ECHO after the stalls were dropped")
    log = node.log_text()
    for source in addresses(2, 3):
        lines = [line for line in log.splitlines() if f"from {source}:" in line]
        assert len(lines) == 1, lines  # one line per dropped connection, with its address
        assert "closed the connection" in lines[0], lines
        assert "did not arrive whole within 3 s" in lines[0] or "no complete PDU for 3 s" in lines[0], lines
    assert "association request did not arrive within 3 s of connecting" in log
    assert "Traceback" not in log and "shorter than expected" not in log


# --- (c) health checks are free -----------------------------------------------------------------


def test_health_and_metrics_requests_cost_the_dr_nothing(node_factory: Any) -> None:
    node = node_factory(("run",), dicom=DR, sync={"enabled": False}).start()
    seconds_until(lambda: healthz(node)[0] == 200, 30, "/healthz 200 after start")
    base = f"http://127.0.0.1:{node.console_port}"

    def one(i: int) -> tuple[int, bool | None]:
        path = "/healthz" if i % 2 == 0 else "/metrics"
        try:
            with urllib.request.urlopen(base + path, timeout=60) as resp:
                body = resp.read()
                return resp.status, json.loads(body)["checks"]["dicom"]["ok"] if path == "/healthz" else None
        except urllib.error.HTTPError as exc:
            return exc.code, None

    offset = len(node.log_text())
    echoes: list[bool] = []
    with ThreadPoolExecutor(10) as pool:
        requests = [pool.submit(one, i) for i in range(300)]
        while not all(r.done() for r in requests):
            echoes.append(echo_succeeds(node))
        answers = [r.result() for r in requests]
    echoes.append(echo_succeeds(node))

    assert all(echoes), f"{echoes.count(False)} of {len(echoes)} DR echoes failed"
    print(f"{len(echoes)} DR echoes during 300 /healthz + /metrics requests, 10 at a time: all succeeded")
    assert [a for a in answers if a[0] != 200] == []
    assert {ok for _, ok in answers[::2]} == {True}  # /healthz said dicom ok every time
    log = node.log_text()[offset:]
    associations = re.findall(r"edge.dicom.service: association from (\S+) ", log)
    assert associations and set(associations) == {"DR1"}, set(associations)  # none for the health checks
    assert "refused a connection" not in log
    with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    assert 'edge_service_up{service="dicom"} 1.0' in metrics
    assert "edge_dicom_accepting 1.0" in metrics


# --- (d) /healthz says when the DR cannot get in -------------------------------------------------


def test_healthz_says_dicom_cannot_accept_while_strangers_hold_every_slot(node_factory: Any) -> None:
    node = node_factory(("run",), dicom={"network_timeout_s": 6.0}, sync={"enabled": False}).start()
    seconds_until(lambda: healthz(node)[0] == 200, 30, "/healthz 200 after start")
    with stallers(node, [a for a in addresses(2, 4) for _ in range(2)]) as held:
        assert all(s.accepted for s in held)  # eight of eight, two per address
        seconds_until(lambda: healthz(node)[0] == 503, 15, "/healthz 503 while every slot is held")
        status, body = healthz(node)
        dicom = body["checks"]["dicom"]
        assert dicom["ok"] is False and dicom["critical"] is True
        assert "cannot accept the DR now (8 of 8 associations in use" in dicom["detail"]
        assert node.status()["services"]["dicom"] in ("full", "up")  # it may already be freeing
        refused = echo(node)
        assert refused.returncode != 0 or "Echo Response (Success)" not in refused.stdout + refused.stderr
        took = seconds_until(lambda: healthz(node)[0] == 200, 40, "/healthz 200 after the stall deadline")
    assert healthz(node)[1]["checks"]["dicom"]["ok"] is True
    assert echo_succeeds(node)
    print(f"/healthz healthy again {took:.1f} s after it said 503 (network_timeout_s = 6)")


def test_dicom_service_gone_is_dicom_not_running(node_factory: Any) -> None:
    node = node_factory().start()
    assert node.status()["services"]["dicom"] == "up"
    node.kill()  # no clean stop: its report stays behind and goes stale
    seconds_until(lambda: node.status()["services"]["dicom"] == "down", 30, "status down after a kill")
    stopped = node_factory(subdir="clean").start()
    assert stopped.status()["services"]["dicom"] == "up"
    assert stopped.stop() == 0
    assert stopped.status()["services"]["dicom"] == "down"  # a clean stop says so at once
    assert not (stopped.data_dir / "run" / "dicom.json").exists()


@pytest.mark.parametrize("share", [1, 3])
def test_max_associations_per_host_is_configurable(node_factory: Any, share: int) -> None:
    node = node_factory(dicom={"max_associations_per_host": share}).start()
    with stallers(node, ["127.0.0.40"] * (share + 2)) as held:
        assert sum(s.accepted for s in held) == share


def test_connect_and_hang_up_in_a_loop_leaves_no_threads_behind(node_factory: Any) -> None:
    node = node_factory(dicom=DR).start()
    assert node.proc is not None

    def threads() -> int:
        status = open(f"/proc/{node.proc.pid}/status").read()  # type: ignore[union-attr]
        return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]

    before = threads()
    for i in range(100):  # a port scanner, or a script that retries at once
        with socket.socket() as s:
            s.bind((f"127.0.0.{2 + i % 40}", 0))
            s.connect(("127.0.0.1", node.port))
    assert echo_succeeds(node)
    # Each hung-up connection's thread ends within moments, not after the 10 s ACSE timeout.
    seconds_until(lambda: threads() <= before + 2, 8, "association threads of hung-up connections ended")
