"""The bridge's ``edge`` subcommands: ecg-sim, ecg-arm, ecg-firmware (registered by edge.node.cli)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from edge.terminal import printable
from firmware_bridge.simulator import INJECTIONS


def add_commands(sub: Any) -> None:
    """Add the bridge's subcommands to the ``edge`` parser (``sub`` is its subparsers)."""
    sim = sub.add_parser("ecg-sim", help="the software ECG box, for demos and tests")
    sim.add_argument("port", help="serial port to speak on; with --pty, where to create the box's port")
    sim.add_argument("--pty", action="store_true",
                     help="create a pty and make PORT a symlink to the node's end (like a box under /dev/serial/by-id)")
    sim.add_argument("--box-id", default="ECG-SIM-0001")
    sim.add_argument("--heart-rate", type=float, default=72.0, help="beats per minute (default 72)")
    sim.add_argument("--inject", action="append", default=[], choices=INJECTIONS,
                     help="a fault to inject (repeat for several)")
    sim.add_argument("--record-every", type=float, default=0.0, metavar="S",
                     help="press the record button every S (box) seconds; 0 = never")
    sim.add_argument("--seconds", type=float, default=10.0, help="length of one recording (default 10)")
    sim.add_argument("--recordings", type=int, default=0, help="exit once this many are acknowledged (0 = run on)")
    sim.add_argument("--duration", type=float, default=0.0, help="exit after this many wall seconds (0 = run on)")
    sim.add_argument("--speed", type=float, default=1.0, help="box seconds per wall second (time compression)")
    sim.add_argument("--sample-rate", type=int, default=500)
    sim.add_argument("--baud", type=int, default=115200)
    sim.add_argument("--fw-version", default="1.0.0")
    sim.add_argument("--reject-firmware", action="store_true", help="every firmware image fails verification")
    sim.add_argument("--corrupt-chunk", type=int, default=None, metavar="N",
                     help="the Nth firmware chunk arrives garbled (the box NAKs it)")
    sim.add_argument("--json", action="store_true", help="print the box's counters as JSON at exit")
    sim.add_argument("--leads", type=_lead_set, default=None, metavar="I,II,V1,…",
                     help="lead set HELLO announces (default all eight; fewer: the node refuses the box)")
    sim.set_defaults(func=cmd_ecg_sim, config_path_only=True)  # needs no edge.toml

    arm = sub.add_parser("ecg-arm", help="link a box's next recording to a patient and order")
    arm.add_argument("box_id")
    arm.add_argument("--patient-id", default="")
    arm.add_argument("--patient-name", default="", help="as DICOM wants it: FAMILY^GIVEN")
    arm.add_argument("--accession", default="", help="the order's accession number")
    arm.add_argument("--clear", action="store_true", help="disarm: the next recording is stored unmatched")
    arm.set_defaults(func=cmd_ecg_arm)

    fw = sub.add_parser("ecg-firmware", help="update a box's firmware (stop the bridge on that port first)")
    fw.add_argument("port")
    fw.add_argument("image", type=Path)
    fw.add_argument("--baud", type=int, default=None, help="default: [bridge] baud")
    fw.set_defaults(func=cmd_ecg_firmware)


def _lead_set(text: str) -> tuple[str, ...]:
    from firmware_bridge.const import ACQUIRED_LEADS

    leads = tuple(lead.strip() for lead in text.split(",") if lead.strip())
    unknown = [lead for lead in leads if lead not in ACQUIRED_LEADS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown lead(s) {', '.join(unknown)}; a box acquires {', '.join(ACQUIRED_LEADS)}")
    return leads


def _logging(level: str = "INFO") -> None:
    from edge.terminal import TerminalFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TerminalFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def cmd_ecg_sim(config: Any, args: argparse.Namespace) -> int:
    import serial

    from firmware_bridge.lines import PtyLine, SerialLine
    from firmware_bridge.simulator import SoftwareBox

    _logging()
    try:
        line = PtyLine(Path(args.port)) if args.pty else SerialLine(args.port, args.baud)
    except (OSError, serial.SerialException) as exc:
        print(f"edge ecg-sim: cannot open {printable(args.port)}: {printable(exc)}", file=sys.stderr)
        return 1
    box = SoftwareBox(
        line, args.box_id, args.heart_rate, sample_rate=args.sample_rate, fw_version=args.fw_version,
        baud=args.baud, speed=args.speed, record_every=args.record_every, seconds=args.seconds,
        recordings=args.recordings, inject=tuple(args.inject), reject_firmware=args.reject_firmware,
        corrupt_chunk=args.corrupt_chunk, **({"leads": args.leads} if args.leads is not None else {}),
    )
    signal.signal(signal.SIGTERM, lambda *_: box.stop())
    try:
        stats = box.run(args.duration)
    except KeyboardInterrupt:
        stats = box.stats
    finally:
        line.close()
    summary = {
        "box_id": args.box_id, "fw_version": box.fw_version, "frames": stats.frames, "bytes": stats.bytes,
        "overruns": stats.overruns, "recordings_sent": stats.recordings_sent,
        "recordings_acked": len(stats.recordings_acked), "box_seconds": round(stats.sim_seconds, 1),
        "line_utilisation": round(stats.line_utilisation(args.baud), 4),
        "hello_refused": len(stats.hello_refused), "recordings_refused": stats.naks_unsupported,
    }
    print(json.dumps(summary) if args.json else
          f"ecg-sim: {summary['recordings_acked']}/{summary['recordings_sent']} recording(s) acknowledged, "
          f"{stats.frames} frames, line {100 * summary['line_utilisation']:.1f}% used")
    return 0 if not args.recordings or box.done() else 1


def cmd_ecg_arm(config: Any, args: argparse.Namespace) -> int:
    from edge.store.db import open_database
    from firmware_bridge.boxes import arm_box, disarm_box

    open_database(config.data_dir)
    box = printable(args.box_id)  # ids and names are often pasted: what they carry stays off the terminal
    if args.clear:
        print(f"box {box} disarmed" if disarm_box(args.box_id) else f"box {box} was not armed")
        return 0
    if not args.patient_id:
        print("edge ecg-arm: --patient-id is needed (or --clear)", file=sys.stderr)
        return 2
    if len(args.accession) > 16 or len(args.patient_id) > 64 or len(args.patient_name) > 64:
        print("edge ecg-arm: accession is at most 16 characters, patient id and name at most 64", file=sys.stderr)
        return 2
    arm_box(args.box_id, args.patient_id, args.patient_name, args.accession)
    print(f"box {box} armed: its next recording is for patient {printable(args.patient_id)}"
          + (f", accession {printable(args.accession)}" if args.accession else ""))
    return 0


def cmd_ecg_firmware(config: Any, args: argparse.Namespace) -> int:
    from firmware_bridge.firmware import FirmwareError, update_firmware

    _logging()
    try:
        image = args.image.read_bytes()
    except OSError as exc:
        print(f"edge ecg-firmware: cannot read {printable(args.image)}: {printable(exc.strerror)}", file=sys.stderr)
        return 2
    try:
        result = update_firmware(args.port, image, args.baud or config.bridge.baud)
    except FirmwareError as exc:
        print(f"edge ecg-firmware: {printable(exc)}", file=sys.stderr)
        return 1
    # The box names itself and the image names its version: neither is ours to print raw.
    print(f"box {printable(result.box_id)}: firmware {printable(result.old_version)} -> {printable(result.new_version)}"
          + (f" ({result.resent_chunks} chunk(s) sent again)" if result.resent_chunks else ""))
    return 0
