"""`edge run`: the node's services in two child processes, so nothing the web apps suffer stops ingest.

In one process, ~1000 slow connections to the kiosk or console took the whole node past
its descriptor limit and every association failed; a hung handler or a crash in a web app
would stop C-STORE the same way. So `edge run` is a small supervisor (it imports none of
the services) of:

- **ingest**: ``edge serve dicom bridge`` (the DR's C-STOREs and the ECG boxes), first;
- **web**: ``edge serve sync kiosk console ops``, once ingest is up. Sync goes here, not
  with ingest: decoding and compressing for upload are the node's largest memory spikes,
  and an OOM kill there must not take the DICOM service with it.

Each child is an ordinary ``edge serve`` speaking sd_notify(3) to a socket of ours: its
``READY=1`` says it is up, its ``WATCHDOG=1`` pings say its event loop turns. The
supervisor says ``READY=1`` to systemd (when it runs under a unit) once both are up;
restarts a child that dies, or stops pinging, with a backoff and one log line; stops both
on SIGINT/SIGTERM (web first); and a child dies with the supervisor even when it is
killed (``PR_SET_PDEATHSIG``). A child that fails before it is first up stops the whole
run with its own one-line reason and a non-zero exit: a bad config, a port in use or a
full disk must not hide in a restart loop. Instances kept by ingest reach the sync
service through ``edge.outbox_bell``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from edge import (
    sdnotify,  # and nothing heavier: the supervisor stays a bare interpreter
)
from edge.service import BackgroundTasks  # stdlib only, like sdnotify

log = logging.getLogger("edge.node.supervisor")  # also when run as __main__

# (label, services): started in this order, stopped in reverse.
RUN_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ingest", ("dicom", "bridge")),
    ("web", ("sync", "kiosk", "console", "ops")),
)
SUPERVISOR_ENV = "EDGE_RUN_PID"  # set in a child: the supervisor's pid (then the child dies with it)
CHILD_WATCHDOG_S = 60.0  # a child silent this long is killed and restarted (systemd's WatchdogSec wins)
START_TIMEOUT_S = 120.0  # as the units' TimeoutStartSec
STOP_TIMEOUT_S = 20.0  # SIGTERM, then SIGKILL
RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0
STEADY_S = 60.0  # a child up this long starts again from the shortest backoff
_PR_SET_PDEATHSIG = 1


def exec_supervisor(config_path: Path, node_id: str, log_level: str) -> None:
    """Become the supervisor: `edge` has imported the whole node by now, ``python -m edge.node.supervisor`` needs ~20 MB."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "edge.node.supervisor", "--config", str(config_path.resolve()),
                              "--node-id", node_id, "--log-level", log_level])


def follow_supervisor() -> bool:
    """In a child of `edge run`: be killed when the supervisor dies. False when not a child."""
    pid = os.environ.pop(SUPERVISOR_ENV, "")
    if not pid.isdigit():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("run: cannot ask to die with the supervisor: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError):  # not Linux
        log.warning("run: this system cannot tie a child to the supervisor's life")
    if os.getppid() != int(pid):  # the supervisor died before we asked
        os._exit(1)
    return True


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class _Child:
    """One ``edge serve …`` process and the notify socket it reports to."""

    def __init__(self, label: str, names: tuple[str, ...], config_path: Path, watchdog_s: float) -> None:
        self.label = label
        self.names = names
        self.config_path = config_path
        self.watchdog_s = watchdog_s
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.started_at = 0.0
        self.last_ping = 0.0
        self._sock: socket.socket | None = None

    @property
    def title(self) -> str:
        return f"{self.label} ({', '.join(self.names)})"

    async def spawn(self) -> None:
        self._close_socket()
        self.ready.clear()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        name = f"clinic-edge-run-{os.getpid()}-{self.label}-{secrets.token_hex(6)}"
        sock.bind("\0" + name)  # abstract: nothing to clean up on disk, gone with the socket
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_message)
        env = dict(os.environ)
        env.pop("WATCHDOG_PID", None)
        env.update({
            "NOTIFY_SOCKET": "@" + name,
            "WATCHDOG_USEC": str(int(self.watchdog_s * 1e6)),
            SUPERVISOR_ENV: str(os.getpid()),
        })
        self.started_at = self.last_ping = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge", "--config", str(self.config_path), "serve", *self.names,
            stdin=subprocess.DEVNULL, env=env,
            process_group=0,  # the terminal's Ctrl-C reaches the supervisor only; it stops the children in order
        )

    def _on_message(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(4096)
            except OSError:
                return
            fields = data.decode(errors="replace").split("\n")
            if "READY=1" in fields:
                self.ready.set()
            if "READY=1" in fields or "WATCHDOG=1" in fields:
                self.last_ping = time.monotonic()

    def silent_for(self) -> float:
        return time.monotonic() - self.last_ping

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("run: %s did not stop within %.0f s; killing it", self.title, STOP_TIMEOUT_S)
                self.proc.kill()
                await self.proc.wait()
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


async def _first_of(*aws: asyncio.Future[object] | asyncio.Task[object], timeout: float | None = None) -> set[object]:
    done, pending = await asyncio.wait(aws, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return set(done)


async def _start_first_time(child: _Child, stop: asyncio.Event) -> int | None:
    """Spawn and wait for READY; None when up, else the exit status for the whole run (0: asked to stop)."""
    await child.spawn()
    assert child.proc is not None
    ready = asyncio.ensure_future(child.ready.wait())
    exited = asyncio.ensure_future(child.proc.wait())
    stopping = asyncio.ensure_future(stop.wait())
    done = await _first_of(ready, exited, stopping, timeout=START_TIMEOUT_S)
    if ready in done:
        return None
    if stopping in done:
        return 0
    if exited in done:  # the child already said why in one line (StartupError); do not restart it
        returncode = child.proc.returncode or 1
        log.info("run: stopping: %s %s before it was up", child.title, _exit_reason(returncode))
        return returncode if returncode > 0 else 1
    log.error("run: %s was not up within %.0f s; stopping", child.title, START_TIMEOUT_S)
    return 1


async def _keep_running(child: _Child, stop: asyncio.Event) -> None:
    """Restart the child whenever it exits while the node is meant to run, backing off if it keeps dying."""
    backoff = RESTART_MIN_S
    while not stop.is_set():
        assert child.proc is not None
        exited = asyncio.ensure_future(child.proc.wait())
        stopping = asyncio.ensure_future(stop.wait())
        if stopping in await _first_of(exited, stopping):
            return
        ran_s = time.monotonic() - child.started_at
        if ran_s >= STEADY_S:
            backoff = RESTART_MIN_S
        log.warning("run: %s %s after %.0f s; restarting it in %.0f s",
                    child.title, _exit_reason(child.proc.returncode or 0), ran_s, backoff)
        try:
            await asyncio.wait_for(stop.wait(), backoff)
            return
        except TimeoutError:
            pass
        await child.spawn()
        backoff = min(backoff * 2, RESTART_MAX_S)


async def _watch_for_hangs(children: list[_Child]) -> None:
    """A child whose event loop stopped pinging (or never came up) is killed; _keep_running restarts it."""
    while True:
        await asyncio.sleep(min(1.0, children[0].watchdog_s / 4))
        for child in children:
            if child.proc is None or child.proc.returncode is not None:
                continue
            if child.ready.is_set() and child.silent_for() > child.watchdog_s:
                log.warning("run: %s stopped answering (no watchdog ping for %.0f s); killing it",
                            child.title, child.silent_for())
                child.kill()
            elif not child.ready.is_set() and time.monotonic() - child.started_at > START_TIMEOUT_S:
                log.warning("run: %s was not up within %.0f s of its restart; killing it", child.title, START_TIMEOUT_S)
                child.kill()


async def supervise(config_path: Path, node_id: str) -> int:
    """`edge run` until SIGINT/SIGTERM; the exit status for the command."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    systemd_watchdog_s = sdnotify.watchdog_interval_s()
    watchdog_s = systemd_watchdog_s * 2 if systemd_watchdog_s is not None else CHILD_WATCHDOG_S
    children = [_Child(label, names, config_path.resolve(), watchdog_s) for label, names in RUN_GROUPS]
    started: list[_Child] = []
    tasks = BackgroundTasks("run")
    try:
        for child in children:
            started.append(child)
            outcome = await _start_first_time(child, stop)
            if outcome is not None:
                return outcome
        log.info("run: node %s up: %s", node_id, ", ".join(f"{c.title} pid {c.proc.pid}" for c in children if c.proc))
        sdnotify.notify("READY=1", "STATUS=up: " + ", ".join(n for c in children for n in c.names))
        for c in children:
            tasks.start(_keep_running(c, stop), name=f"keep {c.label}")
        tasks.start(_watch_for_hangs(children), name="hangs")
        if systemd_watchdog_s is not None:
            tasks.start(sdnotify.keep_watchdog_fed(systemd_watchdog_s), name="watchdog")
        await stop.wait()
        log.info("run: node %s stopping", node_id)
        sdnotify.notify("STOPPING=1")
    finally:
        await tasks.stop()
        for child in reversed(started):
            await child.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Only `edge run` calls this (through exec_supervisor), with a config it has already checked."""
    parser = argparse.ArgumentParser(prog="edge run")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return asyncio.run(supervise(args.config, args.node_id))


if __name__ == "__main__":
    sys.exit(main())
