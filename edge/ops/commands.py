"""The fleet commands of ``edge``: doctor, provision, discover, decommission.

Kept here so the ops package owns its own command-line surface; ``edge.node.cli`` only adds
them to its parser with :func:`add_commands`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edge.config import resolve_config_path
from edge.node.config import EdgeConfig
from edge.terminal import printable

if TYPE_CHECKING:
    from edge.ops.provision import Provisioning


def cmd_doctor(config: EdgeConfig, args: argparse.Namespace) -> int:
    from edge.ops.doctor import format_items, run_doctor

    items = asyncio.run(run_doctor(config, str(resolve_config_path(args.config))))
    print(json.dumps([i.as_json() for i in items], indent=2) if args.json else format_items(items))
    return 1 if any(i.verdict == "fail" for i in items) else 0


def cmd_discover(config: EdgeConfig, args: argparse.Namespace) -> int:
    from edge.ops.discovery import discover

    try:
        found = asyncio.run(discover(config.ops.zeroconf_interfaces, timeout_s=args.timeout))
    except (OSError, ValueError) as exc:
        print(f"edge discover: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([f.as_json() for f in found], indent=2))
        return 0
    if not found:
        print(f"nothing found on the LAN in {args.timeout:.0f}s (_dicom._tcp, _http._tcp, _https._tcp)")
        return 0
    for f in found:  # names and TXT records are whatever a device on the LAN announced
        kind = "DICOM" if f.type.startswith("_dicom.") else "HTTPS" if f.type.startswith("_https.") else "HTTP"
        extra = f"aet={f.properties.get('aet', '?')}" if kind == "DICOM" else f"path={f.properties.get('path', '/')}"
        print(f"{kind:5}  {printable(','.join(f.addresses) or '-')}:{f.port:<5}  {printable(extra):20}  {printable(f.name)}")
    return 0


def cmd_decommission(config: EdgeConfig, args: argparse.Namespace) -> int:
    """Take the node out of central monitoring: delete its Pushgateway group and its textfile."""
    from edge.ops.heartbeat import HeartbeatSetupError, delete_group, textfile_path

    status = 0
    if config.ops.pushgateway_url:
        try:
            delete_group(config)
            print(f"deleted node_id={config.node.id} from {config.ops.pushgateway_url}")
        except (HeartbeatSetupError, OSError) as exc:
            print(f"edge decommission: cannot delete the group: {exc}", file=sys.stderr)
            status = 1
    else:
        print("no [ops] pushgateway_url: nothing to delete centrally")
    path = textfile_path(config)
    if path is not None and path.exists():
        path.unlink()
        print(f"removed {path}")
    if status == 0:
        print("stop the node now (systemctl disable --now edge.target), or its next heartbeat recreates the group")
    return status


def _secret(value: str | None) -> str | None:
    """``-`` reads the value from stdin, so a token need not sit in the shell history."""
    if value == "-":
        return sys.stdin.readline().strip()
    return value


def _print_card_file(title: str, text: str) -> None:
    """Text read off a card, one indented line at a time: whatever is on the card cannot drive the terminal."""
    print(title)
    for line in text.rstrip("\n").splitlines():
        print(f"  {printable(line)}")


def _provision_card(config_path: Path, args: argparse.Namespace, prov: Provisioning | None) -> int:
    """--image-file / --image-boot: write (or with --show, print) edge-provision.toml on the card's ESP."""
    from edge.ops.card_image import FIRSTBOOT_ERROR_FILE_NAME, open_card_image
    from edge.ops.provision import (
        PROVISION_FILE_NAME,
        ProvisionError,
        check,
        masked,
        write_boot_file,
    )

    if args.image_file:
        card = open_card_image(Path(args.image_file))
        where = f"{args.image_file} (ESP at byte {card.esp_offset})"
        read = card.read

        def write(text: str) -> str:
            card.write(PROVISION_FILE_NAME, text.encode("utf-8"))
            return f"{PROVISION_FILE_NAME} to {where}"
    else:
        boot = Path(args.image_boot)
        if not boot.is_dir():
            raise ProvisionError(f"{boot}: not a folder (mount the image's boot partition first)")
        where = str(boot)

        def read(name: str) -> bytes | None:
            return (boot / name).read_bytes() if (boot / name).is_file() else None

        def write(text: str) -> str:
            return str(write_boot_file(boot, text))

    if prov is not None:
        check(config_path, prov, PROVISION_FILE_NAME)  # the box would refuse it at first boot: refuse it here
        print(f"wrote {write(prov.to_toml())}: applied and deleted on the node's first boot")
    else:
        current = read(PROVISION_FILE_NAME)
        if current is None:
            print(f"no {PROVISION_FILE_NAME} on {where} (a provisioned node has deleted it)")
        else:
            _print_card_file(f"{PROVISION_FILE_NAME} on {where} (credentials masked):",
                             masked(current.decode("utf-8", "replace")))
    failed = read(FIRSTBOOT_ERROR_FILE_NAME)
    if failed is not None:  # left by image/firstboot.sh; the next successful first boot removes it
        _print_card_file("the last first boot failed:", failed.decode("utf-8", "replace"))
    return 0


def _escrowed_disk_key(escrow: Path) -> bytes:
    """32 random bytes for LUKS2, kept first in a new mode-600 file (never overwrites one: it may be another box's)."""
    key = os.urandom(32)
    fd = os.open(escrow, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(key).decode() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return key


def cmd_provision(config_path: Path, args: argparse.Namespace) -> int:
    from edge.ops.provision import (
        ProvisionError,
        Provisioning,
        apply,
        check,
        read_provision_file,
        write_disk_key,
    )

    try:
        if args.show:
            if not (args.image_file or args.image_boot):
                print("edge provision: --show needs --image-file IMG or --image-boot DIR", file=sys.stderr)
                return 2
            return _provision_card(config_path, args, None)
        prov = read_provision_file(Path(args.from_file)) if args.from_file else Provisioning()
        prov.set("node", "id", args.node_id)
        prov.set("node", "name", args.name)
        prov.set("dicom", "ae_title", args.ae_title)
        prov.set("dicom", "modality_ae", args.modality_ae)
        prov.set("dicom", "modality_host", args.modality_host)
        prov.set("dicom", "modality_port", args.modality_port)
        prov.set("cloud", "dicomweb_url", args.cloud_url)
        prov.set("ops", "pushgateway_url", args.pushgateway_url)
        token = _secret(args.token)
        if token:
            prov.secrets["secrets"] = {"token": token}
        push_token = _secret(args.pushgateway_token)
        if push_token:
            prov.secrets["pushgateway_secrets"] = {"token": push_token}
        if args.console_tls or args.console_tls_host:
            prov.console_tls_hosts = [*(prov.console_tls_hosts or []), *(args.console_tls_host or [])]
        if args.new_disk_key:
            if not (args.image_file or args.image_boot):
                print("edge provision: --new-disk-key is for a card (--image-file IMG or --image-boot DIR)", file=sys.stderr)
                return 2
            prov.disk_key = _escrowed_disk_key(Path(args.new_disk_key))
            print(f"new data partition key saved to {args.new_disk_key} (mode 600): give it to central ops to keep; "
                  "it is the only way into this box's data if the box's own copy is lost")
        if not prov.settings and not prov.secrets and prov.disk_key is None and prov.console_tls_hosts is None:
            print("edge provision: nothing to write (give --node-id, --cloud-url, --token … or --from-file)", file=sys.stderr)
            return 2
        if args.check:  # first boot's gate: the whole file against the node's schema, nothing written
            check(config_path, prov, args.from_file or "edge provision")
            print("ok")
            if not args.disk_key_out:
                return 0
        if args.disk_key_out:  # first boot, before the data partition (and so edge.toml) exists
            if prov.disk_key is None:
                print("edge provision: the provisioning file has no [disk] luks_key", file=sys.stderr)
                return 2
            write_disk_key(Path(args.disk_key_out), prov.disk_key)
            print(f"wrote the data partition key to {args.disk_key_out}")
            return 0
        if args.image_boot or args.image_file:
            return _provision_card(config_path, args, prov)
        changed = apply(config_path, prov)
    except ProvisionError as exc:
        print(f"edge provision: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edge provision: cannot write: {exc}", file=sys.stderr)
        return 1
    print("\n".join(f"set {c}" for c in changed) if changed else "already provisioned: nothing changed")
    return 0


def cmd_update(config_path: Path, args: argparse.Namespace) -> int:
    """Needs no edge.toml: an update must work on a node whose config is broken."""
    from edge.appliance.update import run

    return run(args.bundle, args.tries, reboot=not args.no_reboot)


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add doctor, provision, discover, decommission and update to ``edge``'s sub-commands."""
    doctor = sub.add_parser("doctor", help="field self-check: a pass/fail line per item, with a fix")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=cmd_doctor)

    discover = sub.add_parser("discover", help="list DICOM and HTTP services announced on the LAN (zeroconf)")
    discover.add_argument("--timeout", type=float, default=3.0, help="seconds to listen (default 3)")
    discover.add_argument("--json", action="store_true", help="machine-readable output")
    discover.set_defaults(func=cmd_discover)

    decommission = sub.add_parser("decommission", help="remove this node from central monitoring (Pushgateway group)")
    decommission.set_defaults(func=cmd_decommission)

    prov = sub.add_parser("provision", help="write node identity and cloud credentials onto this node or an image")
    prov.add_argument("--node-id", help="[node] id, e.g. clinic-0042")
    prov.add_argument("--name", help="[node] name: the clinic's name")
    prov.add_argument("--ae-title", help="[dicom] ae_title: this node's AE title")
    prov.add_argument("--modality-ae", help="[dicom] modality_ae: the DR's AE title")
    prov.add_argument("--modality-host", help="[dicom] modality_host: the DR's address")
    prov.add_argument("--modality-port", type=int, help="[dicom] modality_port: the DR's DICOM port")
    prov.add_argument("--cloud-url", help="[cloud] dicomweb_url")
    prov.add_argument("--token", help="cloud bearer token, into [cloud] secrets_file (mode 600); - reads stdin")
    prov.add_argument("--pushgateway-url", help="[ops] pushgateway_url")
    prov.add_argument("--pushgateway-token", help="Pushgateway bearer token, into [ops] pushgateway_secrets_file; - reads stdin")
    prov.add_argument("--console-tls", action="store_true",
                      help="make a self-signed certificate and key (mode 600) for the console's https, for this "
                           "node's names and addresses, and set [console] tls_cert/tls_key (kept if already there)")
    prov.add_argument("--console-tls-host", action="append", metavar="NAME",
                      help="another name or address the certificate must cover (repeatable; implies --console-tls)")
    prov.add_argument("--new-disk-key", metavar="ESCROW_FILE",
                      help="with --image-file/--image-boot: generate the data partition's key ([disk] luks_key, 32 random "
                           "bytes) and save it to ESCROW_FILE (new file, mode 600) for central ops to keep")
    prov.add_argument("--from-file", help="a provisioning file (edge-provision.toml) to apply")
    prov.add_argument("--disk-key-out", help="only write the file's [disk] luks_key here (mode 600): first boot's step before the data partition exists")
    card = prov.add_mutually_exclusive_group()
    card.add_argument("--image-boot", metavar="DIR", help="write edge-provision.toml into a mounted boot partition (ESP) instead")
    card.add_argument("--image-file", metavar="IMG",
                      help="write edge-provision.toml into the ESP of a raw card image (or a card in a reader) "
                           "without mounting it or root (needs mtools and fdisk); writing again replaces it")
    prov.add_argument("--show", action="store_true",
                      help="with --image-file/--image-boot: print the card's edge-provision.toml (credentials masked) "
                           "and why its last first boot failed, if it did")
    prov.add_argument("--check", action="store_true",
                      help="validate the provisioning against the node's config schema (merged onto --config in memory); "
                           "print ok or the bad key, write nothing")
    prov.set_defaults(func=cmd_provision, config_path_only=True)

    from edge.appliance.update import add_arguments as add_update_arguments

    update = sub.add_parser("update", help="install an update bundle into the other slot and reboot into it (as root)")
    add_update_arguments(update)
    update.set_defaults(func=cmd_update, config_path_only=True)
