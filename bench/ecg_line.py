#!/usr/bin/env python3
"""ECG line budget: 8 leads x 500 Hz over 115200 baud, and the bridge's CPU per box.

Goals (issue 3): < 80 % of the line, < 5 % of one core per box.

    .venv/bin/python bench/ecg_line.py                # 1 box, a box-minute at 10x speed
    .venv/bin/python bench/ecg_line.py --boxes 4      # per-box CPU with four boxes at once
    .venv/bin/python bench/ecg_line.py --speed 1      # the honest real-time minute (60 s)

The bridge runs as the real ``edge serve bridge`` process; the software boxes run here on
ptys, so their CPU is not counted against the bridge. With ``--speed`` above 1 the boxes
stream faster than real time: the bridge's CPU seconds are divided by box seconds, which
counts all the per-byte work but under-counts the idle-loop wake-ups (``--speed 1`` counts
those too).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from firmware_bridge.const import SAMPLES_PER_BLOCK, Msg
from firmware_bridge.lines import PtyLine
from firmware_bridge.protocol import Samples, Status, encode_frame
from firmware_bridge.simulator import SoftwareBox

LINE_GOAL, CPU_GOAL = 0.80, 0.05


def line_budget(baud: int, rate: int, leads: int = 8) -> tuple[float, int]:
    """Share of a 8N1 line one box uses while recording, from the real frame sizes."""
    block = len(encode_frame(Msg.SAMPLES, 1, Samples(1, 0, np.zeros((SAMPLES_PER_BLOCK, leads), np.int16)).pack()))
    status = len(encode_frame(Msg.STATUS, 1, Status(80, 0, 0).pack()))
    per_second = block * rate / SAMPLES_PER_BLOCK + status
    return per_second * 10 / baud, block


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boxes", type=int, default=1)
    parser.add_argument("--box-seconds", type=float, default=60.0, help="streaming per box (default: a minute)")
    parser.add_argument("--speed", type=float, default=10.0, help="time compression (1 = real time)")
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--rate", type=int, default=500)
    args = parser.parse_args()

    budget, block = line_budget(args.baud, args.rate)
    print(f"frame: {block} bytes per SAMPLES block ({SAMPLES_PER_BLOCK} samples x 8 leads, int16) "
          f"-> {budget:.1%} of {args.baud} baud while recording")

    with tempfile.TemporaryDirectory(prefix="ecg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        links = [tmp / f"usb-box{i}" for i in range(args.boxes)]
        lines = [PtyLine(link) for link in links]
        (tmp / "edge.toml").write_text(
            f'[node]\nid = "bench"\n[storage]\ndata_dir = "{tmp / "var"}"\nmin_free_mb = 0\n'
            f'[bridge]\nports = {[str(p) for p in links]!r}\nport_glob = ""\nbaud = {args.baud}\n'
            '[logging]\nlevel = "WARNING"\n'.replace("'", '"')
        )
        bridge = subprocess.Popen([sys.executable, "-m", "edge", "--config", str(tmp / "edge.toml"), "serve", "bridge"],
                                  cwd=REPO, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(2.0)  # imports, database, ports opened
            if bridge.poll() is not None:
                print(bridge.stderr.read() if bridge.stderr else "", file=sys.stderr)
                return 1
            recordings = max(1, round(args.box_seconds / 10))
            boxes = [
                SoftwareBox(line, f"BENCH-{i}", sample_rate=args.rate, baud=args.baud, speed=args.speed,
                            record_every=0.001, seconds=10.0, recordings=recordings, seed=i)
                for i, line in enumerate(lines)
            ]
            cpu0, wall0 = cpu_seconds(bridge.pid), time.monotonic()
            threads = [threading.Thread(target=box.run, kwargs={"duration": 30 + 2 * args.box_seconds / args.speed})
                       for box in boxes]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            cpu1, wall1 = cpu_seconds(bridge.pid), time.monotonic()
        finally:
            bridge.terminate()
            bridge.wait(20)
            for line in lines:
                line.close()

    box_seconds = sum(b.stats.sim_seconds for b in boxes)
    acked = sum(len(b.stats.recordings_acked) for b in boxes)
    wanted = recordings * args.boxes
    measured = max(b.stats.line_utilisation(args.baud) for b in boxes)
    cpu = cpu1 - cpu0
    per_box = cpu / box_seconds if box_seconds else float("inf")
    overruns = sum(b.stats.overruns for b in boxes)
    print(f"run: {args.boxes} box(es) x {box_seconds / args.boxes:.0f} box seconds at {args.speed:g}x "
          f"in {wall1 - wall0:.1f} s wall; {acked}/{wanted} recordings acknowledged, {overruns} frames overrun")
    print(f"line utilisation, measured over the run (incl. ACK waits): {measured:.1%}")
    print(f"bridge CPU: {cpu:.2f} s for {box_seconds:.0f} box seconds = {per_box:.2%} of one core per box")
    ok_line = budget < LINE_GOAL and measured < LINE_GOAL
    ok_cpu = per_box < CPU_GOAL
    ok_all = acked == wanted and overruns == 0
    print(f"goal line < {LINE_GOAL:.0%}: {'met' if ok_line else 'MISSED'} ({budget:.1%})")
    print(f"goal CPU < {CPU_GOAL:.0%} of a core per box: {'met' if ok_cpu else 'MISSED'} ({per_box:.2%})")
    if not ok_all:
        print("MISSED: not every recording was acknowledged without overrun")
    return 0 if ok_line and ok_cpu and ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
