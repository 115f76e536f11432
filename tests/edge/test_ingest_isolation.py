"""Ingest apart from the web apps (issue 12): nothing done to the kiosk or console stops the DR.

`edge run` is a supervisor of two children, ingest (dicom, bridge) and web (sync, kiosk,
console, ops). Before, one process held everything: ~1000 slow HTTP connections took it
past 1024 descriptors and every association failed. These tests attack the web apps of a
real `edge run` with raw sockets and check with DCMTK what the DR would see.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EdgeNode
from tests.dicom_factory import make_dx
from tests.edge.helpers import echo, storescu
from tests.waiting import wait_until

SLOW_CONNECTIONS = 1100  # past the 1024 descriptors one process had
HEADER_TIMEOUT_S = 8.0




def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone: it holds no socket)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(node: EdgeNode) -> dict[str, int]:
    """The supervisor's children by role: {"ingest": pid, "web": pid} (those alive)."""
    assert node.proc is not None
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != node.proc.pid or b"serve" not in argv or not alive(int(entry)):
            continue
        found["ingest" if b"dicom" in argv else "web"] = int(entry)
    return found


def both_children(node: EdgeNode) -> dict[str, int]:
    return wait_until(lambda: (c := children(node)) and len(c) == 2 and c, 30, "both children of edge run")


def kiosk_port(node: EdgeNode) -> int:
    import tomllib

    return int(tomllib.loads(node.config.read_text())["kiosk"]["port"])


def http_status(port: int, path: str = "/healthz") -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the node binds on restart
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def stored(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0 and "Received Store Response (Success)" in result.stderr


@contextlib.contextmanager
def many_open_files() -> Iterator[None]:
    """This test process needs more than 1024 sockets itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < SLOW_CONNECTIONS + 200:
        pytest.skip(f"the hard open-files limit {hard} is too low for {SLOW_CONNECTIONS} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def run_node(node_factory: Any, **sections: Any) -> EdgeNode:
    limits = {"http_header_timeout_s": HEADER_TIMEOUT_S}
    merged = {"sync": {"enabled": False}, "reports": {"enabled": False}, **sections}
    for app in ("console", "kiosk"):
        merged[app] = {**limits, **merged.get(app, {})}
    node: EdgeNode = node_factory(("run",), **merged)
    return node.start()


def test_the_dr_stores_while_a_thousand_slow_connections_hold_the_kiosk_and_console(
    node_factory: Any, tmp_path: Path
) -> None:
    node = run_node(node_factory)
    ports = (node.console_port, kiosk_port(node))
    image = tmp_path / "chest.dcm"
    make_dx(image)
    with many_open_files():
        opened: dict[socket.socket, tuple[int, float]] = {}
        try:
            for i in range(SLOW_CONNECTIONS):
                port = ports[i % 2]
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                if i % 4 < 2:  # half idle, half a request head that never ends (slowloris)
                    with contextlib.suppress(OSError):
                        sock.sendall(b"GET / HTTP/1.1\r\nHost: clinic\r\nX-Wait: ")
                opened[sock] = (port, time.monotonic())

            # The DR, meanwhile: C-ECHO and C-STORE as always.
            answer = echo(node)
            assert answer.returncode == 0 and "Received Echo Response (Success)" in answer.stdout + answer.stderr, answer
            assert stored(storescu(node, image)), "C-STORE failed while the web apps were flooded"

            # Every slow connection is closed by the node: at once over the cap (503), else after the header timeout.
            busy: dict[int, int] = {port: 0 for port in ports}
            said_busy = 0
            timed_out: dict[int, list[float]] = {port: [] for port in ports}
            selector = selectors.DefaultSelector()
            for sock in opened:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            received: dict[socket.socket, bytes] = {}
            deadline = time.monotonic() + HEADER_TIMEOUT_S + 60
            while selector.get_map() and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=1.0):
                    sock = key.fileobj  # type: ignore[assignment]
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:  # reset: the node aborted it
                        data = b""
                    if data:
                        received[sock] = received.get(sock, b"") + data
                        continue
                    selector.unregister(sock)
                    port, since = opened[sock]
                    said_busy += received.get(sock, b"").startswith(b"HTTP/1.1 503")
                    lasted = time.monotonic() - since
                    if lasted < HEADER_TIMEOUT_S * 0.75:  # turned away at the cap (503, or reset over our unread head)
                        busy[port] += 1
                    else:
                        timed_out[port].append(lasted)
            still_open = len(selector.get_map())
            selector.close()
        finally:
            for sock in opened:
                sock.close()
    assert still_open == 0, f"{still_open} slow connections were never closed by the node"
    for port in ports:
        assert busy[port] > 0, f"port {port}: no connection was turned away at the cap"
        assert timed_out[port], f"port {port}: no connection waited for the header timeout"
    assert said_busy > 0, "no connection over the cap was told 503"
    assert wait_until(lambda: http_status(node.console_port) == 200, 30, "the console answering again")
    assert stored(storescu(node, image))
    assert "Traceback" not in node.log_text()


def test_a_whole_request_head_stops_the_header_timer_and_idle_keep_alive_is_closed(node_factory: Any) -> None:
    node = run_node(node_factory, console={"http_header_timeout_s": 1.5, "http_keepalive_s": 4.0})
    request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{node.console_port}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", node.console_port), timeout=30) as sock:
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(2.5)  # past the header timeout: time must pass here, there is nothing to wait on
        sock.sendall(request)  # the same keep-alive connection still serves
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:80]
        answered = time.monotonic()
        sock.settimeout(30)
        while True:  # then it idles: the node closes it after http_keepalive_s
            try:
                if not sock.recv(65536):
                    break
            except ConnectionResetError:
                break
        idle = time.monotonic() - answered
    assert 4.0 * 0.75 <= idle < 25, idle


def test_killing_the_web_process_never_stops_c_store_and_it_comes_back(node_factory: Any, tmp_path: Path) -> None:
    node = run_node(node_factory)
    before = both_children(node)
    images = []
    for i in range(40):
        images.append(tmp_path / f"dx{i}.dcm")
        make_dx(images[-1], seed=i, accession=f"ACC{i:04d}")
    results: list[subprocess.CompletedProcess[str]] = []
    done = threading.Event()

    def dr_keeps_sending() -> None:
        # Round and round until told to stop (repeats are answered Success and kept once):
        # a fast machine must not run out of images before the web process is back.
        for image in itertools.islice(itertools.cycle(images), 2000):
            results.append(storescu(node, image))
            if done.is_set():
                return

    sender = threading.Thread(target=dr_keeps_sending)
    sender.start()
    try:
        wait_until(lambda: results, 60, "a first C-STORE")
        os.kill(before["web"], signal.SIGKILL)
        wait_until(lambda: not alive(before["web"]), 10, "the web process gone")
        after = wait_until(lambda: (c := children(node)).get("web") not in (None, before["web"]) and c, 60,
                           "a new web process")
        assert wait_until(lambda: http_status(node.console_port) == 200, 60, "the console answering again")
        count = len(results)
        wait_until(lambda: len(results) >= count + 2, 60, "C-STOREs after the restart")
    finally:
        done.set()
        sender.join(120)
    assert all(stored(r) for r in results), [r.stderr[-300:] for r in results if not stored(r)][:1]
    assert after["ingest"] == before["ingest"], "the DICOM process was restarted too"
    assert "web (sync, kiosk, console, ops) was killed by SIGKILL" in node.log_text()
    assert "restarting it in" in node.log_text()


def test_a_frozen_web_process_is_killed_and_restarted_while_c_store_goes_on(
    node_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "6000000")  # the children ping every 3 s; silent for 6 s is hung
    node = run_node(node_factory)
    before = both_children(node)
    image = tmp_path / "dx.dcm"
    make_dx(image)
    os.kill(before["web"], signal.SIGSTOP)  # a handler stuck holding the GIL, as far as anyone can tell
    try:
        assert http_status(node.console_port) is None  # the console no longer answers
        assert stored(storescu(node, image))
        answer = echo(node)
        assert answer.returncode == 0, answer
        wait_until(lambda: children(node).get("web") not in (None, before["web"]), 60, "the frozen web process replaced")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(before["web"], signal.SIGCONT)
    assert wait_until(lambda: http_status(node.console_port) == 200, 60, "the console answering again")
    assert "stopped answering (no watchdog ping" in node.log_text()
    assert children(node)["ingest"] == before["ingest"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_stopping_edge_run_stops_every_child_and_frees_the_ports(node_factory: Any, sig: signal.Signals) -> None:
    node = run_node(node_factory)
    pids = both_children(node)
    ports = (node.port, node.console_port, kiosk_port(node))
    assert node.proc is not None
    node.proc.send_signal(sig)
    returncode = node.proc.wait(30)
    if sig != signal.SIGKILL:
        assert returncode == 0, node.log_text()[-2000:]
    wait_until(lambda: not any(alive(pid) for pid in pids.values()), 30, f"no child left after {sig.name}")
    wait_until(lambda: all(port_free(port) for port in ports), 30, "every port free")
    node.start()  # and the node comes up again on the same ports
    assert echo(node).returncode == 0


def test_a_child_that_cannot_start_stops_the_run_with_its_reason(node_factory: Any) -> None:
    node: EdgeNode = node_factory(("run",), sync={"enabled": False})
    with socket.socket() as squatter:  # something else holds the console's port
        squatter.bind(("127.0.0.1", node.console_port))
        squatter.listen()
        result = subprocess.run([sys.executable, "-m", "edge", "--config", str(node.config), "run"],
                                capture_output=True, text=True, timeout=120, cwd=node.tmp)
    said = result.stdout + result.stderr
    assert result.returncode == 1, said[-2000:]
    assert "console: cannot start" in said, said[-2000:]
    assert "Traceback" not in said and "restarting" not in said, said[-2000:]
    wait_until(lambda: port_free(node.port), 30, "the DICOM port released by the ingest process")


def test_a_malformed_http_request_is_one_log_line(node_factory: Any) -> None:
    node = run_node(node_factory)
    garbage = {
        node.console_port: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x1b[2J\xff\xfe\r\n\r\n",  # TLS to http
        kiosk_port(node): b"GET / HTTP/1.1\r\nHost: kiosk\r\nno colon in this header\r\n\r\n",
    }
    for port, data in garbage.items():
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(data)
            reply = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(4096):
                    reply += chunk
            assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), reply[:100]

    def lines() -> list[str]:
        return [ln for ln in node.log_text().splitlines() if "malformed HTTP request from 127.0.0.1" in ln]

    wait_until(lambda: len(lines()) >= 2, 30, "the two malformed requests logged")
    found = lines()
    assert len(found) == 2, found
    assert any("console:" in ln for ln in found) and any("kiosk:" in ln for ln in found), found
    assert all("\x1b" not in ln for ln in found), found
    text = node.log_text()
    assert "Traceback" not in text and "Error handling request" not in text, text[-3000:]


def test_serve_accepts_several_services_in_one_process(node_factory: Any) -> None:
    """`edge serve dicom console` (one process, as `edge run` was) still works for a small box."""
    node: EdgeNode = node_factory(("serve", "dicom", "console"), sync={"enabled": False})
    node.start()
    assert echo(node).returncode == 0
    assert http_status(node.console_port) == 200


def test_edge_run_under_systemd_says_ready_once_both_children_are_up(
    node_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "2000000")
        node: EdgeNode = node_factory(("run",), sync={"enabled": False})
        node.start()
        sock.settimeout(30)
        messages: list[str] = []
        while not any(m.startswith("READY=1") for m in messages):
            messages.append(sock.recv(4096).decode())
        ready = next(m for m in messages if m.startswith("READY=1"))
        assert "dicom" in ready and "console" in ready, ready
        assert http_status(node.console_port) == 200  # the web apps were up when READY was said
        while "WATCHDOG=1" not in messages:  # the supervisor feeds systemd's watchdog
            messages.append(sock.recv(4096).decode())
        assert sum(m.startswith("READY=1") for m in messages) == 1  # the children's READY went to the supervisor
        assert node.stop() == 0
        while not any("STOPPING=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())


def test_the_console_in_another_process_shows_the_dicom_services_counters(node_factory: Any, tmp_path: Path) -> None:
    """C-STORE counters live in the DICOM process; /metrics in the console's process shows them (run/dicom.prom)."""
    dicom: EdgeNode = node_factory(("serve", "dicom"), sync={"enabled": False})
    dicom.start()
    console = node_factory.another_service(dicom, ("serve", "console")).start()
    image = tmp_path / "dx.dcm"
    make_dx(image)
    assert stored(storescu(dicom, image))

    def kept_in_metrics() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{console.console_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return 'edge_dicom_cstore_total{result="kept"} 1.0' in text

    assert wait_until(kept_in_metrics, 30, "the kept C-STORE on the console's /metrics")
