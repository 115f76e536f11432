"""The appliance as a field engineer's box: a QEMU VM booting the built disk image.

QEMU runs inside a network namespace this module creates with only loopback in it, so
the guest's user-mode network reaches nothing but that namespace's own loopback (which
it sees as 10.0.2.2). The test itself stays in the host's namespace: each TCP port that
must cross (the node's DICOM and console ports inward, the cloud proxy outward) goes
through a pair of socats joined by a unix socket, which both namespaces can open.

The guest is read and driven through the QEMU guest agent on a virtio-serial port
(``guest-exec``), not ssh: the appliance has no ssh server. Its serial console is kept
in ``serial.log``. ``kill()`` is a power cut: SIGKILL to QEMU, so the guest's page cache
and anything it had not flushed to the virtual disk is gone.

Pytest-free, so a benchmark can use it too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.node import free_port

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
FIGURES: dict[str, str] = {}
"""What the boxes measured (build, boots, memory, updates): conftest prints them after every run."""
GUEST_HOST_ADDRESS = "10.0.2.2"
"""The namespace's loopback as the guest sees it (QEMU user-mode networking)."""


def kvm_usable() -> bool:
    """KVM only where the CPU and /dev/kvm really allow it (here: /dev/kvm exists, no vmx)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    cpuinfo = Path("/proc/cpuinfo").read_text()
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", cpuinfo, re.M))


class Netns:
    """A network namespace with only loopback, removed on close."""

    def __init__(self) -> None:
        self.name = f"edge-vm-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


class Bridge:
    """One TCP port joined across namespaces: ``listen`` side accepts, ``connect`` side dials.

    ``inward``: the host's 127.0.0.1:host_port reaches the namespace's 127.0.0.1:ns_port.
    ``outward``: the namespace's 127.0.0.1:ns_port reaches the host's 127.0.0.1:host_port.
    """

    def __init__(self, netns: Netns, workdir: Path, ns_port: int, host_port: int, *, inward: bool) -> None:
        sock = workdir / f"bridge-{'in' if inward else 'out'}-{ns_port}-{host_port}.sock"
        sock.unlink(missing_ok=True)
        ns_side = netns.argv("socat", "-T", "600")
        if inward:
            # Dialled per connection, so it is fine that the guest's port is not up yet.
            ns_cmd = [*ns_side, f"UNIX-LISTEN:{sock},fork,unlink-early", f"TCP:127.0.0.1:{ns_port}"]
            host_cmd = ["socat", "-T", "600", f"TCP-LISTEN:{host_port},bind=127.0.0.1,reuseaddr,fork", f"UNIX-CONNECT:{sock}"]
            first, second = ns_cmd, host_cmd
        else:
            host_cmd = ["socat", "-T", "600", f"UNIX-LISTEN:{sock},fork,unlink-early", f"TCP:127.0.0.1:{host_port}"]
            ns_cmd = [*ns_side, f"TCP-LISTEN:{ns_port},bind=127.0.0.1,reuseaddr,fork", f"UNIX-CONNECT:{sock}"]
            first, second = host_cmd, ns_cmd
        self.procs = [subprocess.Popen(first, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        _wait_for(lambda: sock.exists(), 10, f"socat listening on {sock}")
        self.procs.append(subprocess.Popen(second, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.2)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(10)


def _wait_for(check, timeout: float, what: str, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class GuestAgentError(RuntimeError):
    pass


class GuestAgent:
    """QEMU guest agent protocol (JSON lines) over the VM's unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _connection(self, timeout: float) -> Iterator[socket.socket]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(self.path))
            yield s
        finally:
            s.close()

    def _call(self, s: socket.socket, buf: list[bytes], execute: str, **arguments: object) -> object:
        s.sendall(json.dumps({"execute": execute, "arguments": arguments}).encode() + b"\n")
        while True:
            while b"\n" not in buf[0]:
                chunk = s.recv(65536)
                if not chunk:
                    raise GuestAgentError("guest agent closed the connection")
                buf[0] += chunk
            line, buf[0] = buf[0].split(b"\n", 1)
            line = line.strip().lstrip(b"\xff")
            if not line:
                continue
            answer = json.loads(line)
            if "error" in answer:
                raise GuestAgentError(f"{execute}: {answer['error']}")
            if "return" in answer:
                return answer["return"]

    def _synced(self, s: socket.socket, buf: list[bytes]) -> None:
        # A fresh connection per call; guest-sync with a random id skips any stale answer
        # left from an earlier connection (qemu-ga docs, "guest-sync").
        token = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
        while True:
            if self._call(s, buf, "guest-sync", id=token) == token:
                return

    def ping(self, timeout: float = 3.0) -> bool:
        try:
            with self._connection(timeout) as s:
                buf = [b""]
                self._synced(s, buf)
                return True
        except (OSError, GuestAgentError, ValueError):
            return False

    def run(self, *argv: str, timeout: float = 120.0, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command as root in the guest; its exit code and output, like subprocess.run."""
        with self._connection(30.0) as s:
            buf = [b""]
            self._synced(s, buf)
            args: dict[str, object] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
            if input is not None:
                args["input-data"] = base64.b64encode(input).decode()
            pid = self._call(s, buf, "guest-exec", **args)["pid"]  # type: ignore[index]
            deadline = time.monotonic() + timeout
            while True:
                status = self._call(s, buf, "guest-exec-status", pid=pid)
                assert isinstance(status, dict)
                if status.get("exited"):
                    out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
                    err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
                    return subprocess.CompletedProcess(list(argv), int(status.get("exitcode", -1)), out, err)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"guest command {argv} still running after {timeout:.0f} s")
                time.sleep(0.2)

    def sh(self, script: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-c", script, timeout=timeout)

    def power_off(self) -> None:
        """A clean shutdown, as the power button asks for one (qemu-ga's guest-shutdown).

        It sends no answer (qemu-ga docs): the agent is stopped with the rest, so waiting
        for the result of ``systemctl poweroff`` would race the shutdown itself.
        """
        with self._connection(30.0) as s:
            buf = [b""]
            self._synced(s, buf)
            s.sendall(json.dumps({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}).encode() + b"\n")


class ApplianceVM:
    """One box: its disk image, its firmware variables (NVRAM), its ports on the host.

    Each of ``guest_ports`` is reached from the host at ``port(guest_port)``; each of
    ``host_services`` (host loopback ports: the cloud proxy, the DR's echo SCP) is what the
    guest reaches at ``10.0.2.2:<same port>``.
    """

    def __init__(
        self, disk: Path, workdir: Path, *, guest_ports: tuple[int, ...] = (11112, 8080),
        host_services: tuple[int, ...] = (), memory_mb: int = 1024, cpus: int = 2,
        extra_disks: tuple[Path, ...] = (),
    ) -> None:
        self.disk = disk
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.extra_disks = list(extra_disks)
        self.accel = "kvm" if kvm_usable() else "tcg"
        self.netns = Netns()
        self.serial_log = workdir / "serial.log"
        self.agent = GuestAgent(workdir / "qga.sock")
        self.vars = workdir / "OVMF_VARS.fd"
        if not self.vars.exists():
            shutil.copyfile(OVMF_VARS, self.vars)
        self.ns_ports = {port: free_port() for port in guest_ports}
        self.host_ports = {port: free_port() for port in guest_ports}
        self.bridges = [Bridge(self.netns, workdir, self.ns_ports[p], self.host_ports[p], inward=True) for p in guest_ports]
        for port in host_services:
            self.bridges.append(Bridge(self.netns, workdir, port, port, inward=False))
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.boots = 0

    def qemu_argv(self) -> list[str]:
        forwards = ",".join(f"hostfwd=tcp:127.0.0.1:{self.ns_ports[p]}-:{p}" for p in self.ns_ports)
        argv = [
            "qemu-system-x86_64", "-machine", "q35", "-accel", self.accel, "-m", str(self.memory_mb),
            "-smp", str(self.cpus), "-cpu", "host" if self.accel == "kvm" else "max", "-display", "none", "-no-user-config", "-nodefaults",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={self.vars}",
            # writeback honours the guest's flushes (FLUSH reaches the host file); not "unsafe".
            # The card boots first: OVMF's saved entries name PCI slots, which move when sticks
            # are added, and without bootindex it may try a stick or PXE before the card.
            "-drive", f"file={self.disk},format=raw,if=none,id=card,cache=writeback,discard=unmap",
            "-device", "virtio-blk-pci,drive=card,bootindex=0",
            "-netdev", f"user,id=n0,net=10.0.2.0/24{',' + forwards if forwards else ''}",
            "-device", "virtio-net-pci,netdev=n0",
            "-chardev", f"file,id=ser0,path={self.serial_log},append=on", "-serial", "chardev:ser0",
            "-chardev", f"socket,id=qga0,path={self.agent.path},server=on,wait=off",
            "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-device", "virtio-rng-pci",
        ]
        for i, extra in enumerate(self.extra_disks):  # the serial belongs on the device (QEMU 7.2)
            argv += ["-drive", f"file={extra},format=raw,if=none,readonly=on,id=extra{i}",
                     "-device", f"virtio-blk-pci,drive=extra{i},serial=extra{i}"]
        return argv

    def start(self) -> None:
        """Power on."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.agent.path.unlink(missing_ok=True)
        with self.serial_log.open("ab") as log:
            log.write(f"\n=== power on {self.boots + 1} ===\n".encode())
        self.proc = subprocess.Popen(
            self.netns.argv(*self.qemu_argv()), stdin=subprocess.DEVNULL,
            stdout=(self.workdir / "qemu.out").open("ab"), stderr=subprocess.STDOUT,
        )
        self.started_at = time.monotonic()
        self.boots += 1

    def kill(self) -> None:
        """Pull the plug: SIGKILL, no flush, no shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            # ip netns exec execs qemu in place, so this is QEMU itself.
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def serial(self) -> str:
        return self.serial_log.read_text(errors="replace")

    def serial_since_boot(self) -> str:
        text = self.serial()
        marker = f"=== power on {self.boots} ==="
        return text[text.rfind(marker):] if marker in text else text

    def wait_serial(self, pattern: str, timeout: float = 180.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def seen() -> re.Match[str] | None:
            if not self.running():
                raise RuntimeError(f"VM stopped while waiting for {pattern!r}:\n{self.serial_since_boot()[-3000:]}")
            return regex.search(self.serial_since_boot())

        try:
            return _wait_for(seen, timeout, f"{pattern!r} on the serial console", 0.5)  # type: ignore[no-any-return]
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- serial (tail) ---\n{self.serial_since_boot()[-4000:]}") from None

    def wait_agent(self, timeout: float = 240.0) -> float:
        """Until the guest agent answers; seconds since power on."""
        def up() -> bool:
            if not self.running():
                raise RuntimeError(f"VM stopped before its agent answered:\n{self.serial_since_boot()[-3000:]}")
            return self.agent.ping()

        try:
            _wait_for(up, timeout, "the guest agent", 1.0)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- serial (tail) ---\n{self.serial_since_boot()[-4000:]}") from None
        return time.monotonic() - self.started_at

    def port(self, guest_port: int) -> int:
        """The host loopback port that reaches ``guest_port``."""
        return self.host_ports[guest_port]

    def close(self) -> None:
        self.kill()
        for bridge in self.bridges:
            bridge.close()
        self.netns.close()
