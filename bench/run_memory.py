"""`edge run`'s memory: the sum of RSS over all its processes, idle and after a few C-STOREs.

Why: `edge run` became a supervisor of child processes (ingest apart from the web apps);
each Python process costs its own interpreter and imports, and a 1-2 GB box must carry
them. This starts the shipped edge.toml in a temp dir (only the ports moved to free ones,
every listener on loopback, zeroconf off), waits until it listens, and reads /proc.

    .venv/bin/python bench/run_memory.py                 # this checkout
    .venv/bin/python bench/run_memory.py --repo /tmp/old # another checkout (e.g. git archive of main)
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STORESCU = "/usr/bin/storescu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"edge run exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing on port {port} after {timeout} s")


def tree_rss_kib(root: int) -> tuple[int, int]:
    """(sum of VmRSS in KiB, number of processes) for ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, count, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(match.group(1)) if match else 0
        count += 1
        todo += children.get(pid, [])
    return total, count


def shipped_config(repo: Path, where: Path) -> tuple[Path, dict[str, int]]:
    """The repo's edge.toml with free ports, loopback listeners and no mDNS; nothing else changed."""
    ports = {"dicom": free_port(), "console": free_port(), "kiosk": free_port()}
    text = (repo / "edge.toml").read_text()
    out, section = [], ""
    for line in text.splitlines():
        head = re.match(r"^\[(\w+)\]", line)
        if head:
            section = head.group(1)
        if section in ports and re.match(r"^port\s*=", line):
            line = f"port = {ports[section]}"
        elif re.match(r"^bind_address\s*=", line):
            line = 'bind_address = "127.0.0.1"'
        elif section == "ops" and re.match(r"^zeroconf\s*=", line):
            line = "zeroconf = false"
        out.append(line)
    path = where / "edge.toml"
    path.write_text("\n".join(out) + "\n")
    return path, ports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to run (default: this one)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait after start before reading")
    parser.add_argument("--images", type=int, default=5, help="C-STOREs before the second reading")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-run-memory-") as tmp:
        config, ports = shipped_config(args.repo, Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(args.repo)}
        proc = subprocess.Popen([sys.executable, "-m", "edge", "--config", str(config), "run"],
                                cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for port in ports.values():
                wait_for_port(port, proc)
            time.sleep(args.settle)
            idle, procs = tree_rss_kib(proc.pid)
            print(f"{args.repo}: idle after start: {idle / 1024:.0f} MiB RSS over {procs} process(es)")
            if args.images and Path(STORESCU).exists():
                sys.path.insert(0, str(REPO))
                from tests.dicom_factory import make_dx

                files = [Path(tmp) / f"{i}.dcm" for i in range(args.images)]
                for i, path in enumerate(files):
                    make_dx(path, rows=1024, cols=1024, seed=i)
                subprocess.run([STORESCU, "-aet", "DR", "-aec", "EDGE", "127.0.0.1", str(ports["dicom"]),
                                *map(str, files)], check=True, capture_output=True, timeout=120)
                time.sleep(args.settle)
                after, procs = tree_rss_kib(proc.pid)
                print(f"{args.repo}: after {args.images} C-STOREs: {after / 1024:.0f} MiB RSS over {procs} process(es)")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
