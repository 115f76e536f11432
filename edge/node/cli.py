"""The ``edge`` command: run the node, one service, or look at its state."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence

from edge import __version__
from edge.config import CONFIG_ENV, ConfigError, resolve_config_path
from edge.node.config import EdgeConfig, load_config
from edge.node.parts import PARTS_IN_ORDER, SERVICE_NAMES
from edge.node.services import StartupError, run_services

log = logging.getLogger("edge")

UNPROVISIONED = "unprovisioned"
"""``edge serve unprovisioned``: DICOM refused and a page saying what is missing (edge.node.unprovisioned)."""


def _setup_logging(config: EdgeConfig) -> None:
    logging.basicConfig(
        level=config.logging.level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # a library may have called basicConfig at import (python-escpos does)
    )


def _open_store(config: EdgeConfig) -> None:
    from edge.store.db import open_database

    open_database(config.data_dir)


def cmd_run(config: EdgeConfig, args: argparse.Namespace) -> int:
    _setup_logging(config)
    if args.command == "serve" and UNPROVISIONED in args.service:  # the card was never set up: no node to run
        if len(args.service) > 1:
            log.error("%s runs alone: it is what the box runs instead of the node's services", UNPROVISIONED)
            return 2
        from edge.node.unprovisioned import serve_unprovisioned

        return serve_unprovisioned(config)
    if args.command == "run":  # a supervisor of `edge serve` children: ingest apart from the web apps
        from edge.node.supervisor import exec_supervisor

        exec_supervisor(resolve_config_path(args.config), config.node.id, config.logging.level)
    from edge.node.supervisor import follow_supervisor

    names = tuple(n for n in SERVICE_NAMES if n in args.service)
    node_names = SERVICE_NAMES if follow_supervisor() else None  # a child of `edge run`: the node has them all
    try:
        asyncio.run(run_services(config, names, node_names=node_names))
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    return 0


def cmd_studies(config: EdgeConfig, args: argparse.Namespace) -> int:
    from edge.store.queries import list_studies
    from edge.terminal import printable

    _open_store(config)
    rows = list_studies(limit=args.limit)
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
        return 0
    if not rows:
        print("no studies on this node yet")
        return 0
    print(f"{'received (UTC)':20}  {'accession':16}  {'mod':6}  {'inst':>5}  {'sync':11}  {'report':7}  study")
    for r in rows:  # every value came from a DICOM header or the cloud: printable() keeps the terminal ours
        print(
            f"{printable((r.received_at or '')[:19]):20}  {printable(r.accession_number or '-'):16}  "
            f"{printable(','.join(r.modalities) or '-'):6}  {r.instances:>5}  {printable(r.sync_state):11}  "
            f"{printable(r.report_state):7}  {printable(r.study_instance_uid)}"
        )
        if r.last_error:
            print(f"{'':22}reason: {printable(r.last_error)}")
    return 0


def cmd_status(config: EdgeConfig, args: argparse.Namespace) -> int:
    from edge.ops.status import format_status, node_status

    _open_store(config)
    status = node_status(config)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_retry(config: EdgeConfig, args: argparse.Namespace) -> int:
    from sync.outbox import retry_quarantined

    if not args.all and not args.study:
        print("edge retry: name the study UIDs to retry, or --all", file=sys.stderr)
        return 2
    _open_store(config)
    count = retry_quarantined(() if args.all else tuple(args.study))
    if count == 0:
        print("nothing quarantined" + (" in those studies" if args.study else ""))
        return 0 if args.all else 1
    print(f"{count} quarantined instance(s) queued again; the sync service sends them next")
    return 0


SERVING_COMMANDS = ("run", "serve")
"""What a unit starts: these skip importing the other commands' modules (seconds on a slow box)."""


def _serving(argv: Sequence[str]) -> bool:
    """Is this ``edge [--config PATH] run|serve ...``?"""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--config" else 1
    return i < len(argv) and argv[i] in SERVING_COMMANDS


def build_parser(part_commands: bool = True) -> argparse.ArgumentParser:
    """Every command; ``part_commands=False``: only the node's own (run, serve, studies, status, retry)."""
    parser = argparse.ArgumentParser(prog="edge", description="Clinic Edge node")
    parser.add_argument("--config", help=f"path to edge.toml (default: ${CONFIG_ENV} or ./edge.toml)")
    parser.add_argument("--version", action="version", version=f"edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="all services: ingest and the web apps in separate processes").set_defaults(func=cmd_run)
    serve = sub.add_parser("serve", help="one service, as its systemd unit runs it (or several in one process)")
    serve.add_argument("service", nargs="+", choices=(*SERVICE_NAMES, UNPROVISIONED))
    serve.set_defaults(func=cmd_run)
    studies = sub.add_parser("studies", help="local studies with their sync and report state")
    studies.add_argument("--json", action="store_true", help="machine-readable output")
    studies.add_argument("--limit", type=int, default=None, help="newest N studies only")
    studies.set_defaults(func=cmd_studies)
    status = sub.add_parser("status", help="node health: services, queue, disk")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    retry = sub.add_parser("retry", help="send quarantined instances again, once the cause is fixed")
    retry.add_argument("study", nargs="*", help="Study Instance UIDs (see edge studies)")
    retry.add_argument("--all", action="store_true", help="every quarantined instance")
    retry.set_defaults(func=cmd_retry)
    for part in PARTS_IN_ORDER if part_commands else ():  # ecg-*, kiosk, user, doctor, provision, discover, decommission
        if part.add_commands is not None:
            part.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(part_commands=not _serving(words)).parse_args(words)
    if getattr(args, "config_path_only", False):  # edge provision: writes the file, need not load it
        return int(args.func(resolve_config_path(args.config), args))
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"edge: config error: {exc}", file=sys.stderr)
        return 2
    return int(args.func(config, args))


if __name__ == "__main__":
    sys.exit(main())
