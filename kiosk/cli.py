"""``edge kiosk …``: the technician's side of the kiosk until the console has screens for it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.terminal import printable

if TYPE_CHECKING:  # the whole config is the roof's; a part only reads it
    from edge.node.config import EdgeConfig


def _open_store(config: EdgeConfig) -> None:
    from edge.store.db import open_database

    open_database(config.data_dir)


def cmd_allow_reprint(config: EdgeConfig, args: argparse.Namespace) -> int:
    from kiosk.tickets import allow_reprint

    _open_store(config)
    try:
        extra = allow_reprint(args.code, by=args.by, count=args.count)
    except LookupError as exc:
        print(f"edge kiosk allow-reprint: {printable(exc)}", file=sys.stderr)
        return 1
    print(f"allowed: the patient can print {args.count} more time(s) ({extra} beyond the limit of "
          f"{config.kiosk.print_limit} in all); the code is unlocked")
    return 0


def cmd_issue_ticket(config: EdgeConfig, args: argparse.Namespace) -> int:
    from kiosk.slip import render_slip
    from kiosk.tickets import issue_ticket

    _open_store(config)
    try:
        ticket = issue_ticket(args.accession, args.name, args.exam, pin_digits=config.kiosk.pin_digits,
                              valid_days=config.kiosk.ticket_valid_days)
    except ValueError as exc:
        print(f"edge kiosk issue-ticket: {printable(exc)}", file=sys.stderr)
        return 2
    if args.slip:
        pdf = render_slip(ticket.code, ticket.pin, config.node.name, config.kiosk.collect_at, ticket.expires_at,
                          args.lang)
        Path(args.slip).write_bytes(pdf)
    print(json.dumps({"code": ticket.code, "pin": ticket.pin, "expires_at": ticket.expires_at.isoformat() + "Z"})
          if args.json else f"code {ticket.code}  PIN {ticket.pin}" + (f"  slip {printable(args.slip)}" if args.slip else ""))
    return 0


def cmd_audit(config: EdgeConfig, args: argparse.Namespace) -> int:
    from kiosk.tables import KioskAudit
    from kiosk.tickets import normalise_code

    _open_store(config)
    query = KioskAudit.select().order_by(KioskAudit.at.desc(), KioskAudit.id.desc()).limit(args.limit)
    if args.code:
        query = query.where(KioskAudit.code == (normalise_code(args.code) or args.code))
    rows: list[dict[str, Any]] = [
        {"at": r.at.replace(microsecond=0).isoformat() + "Z", "action": r.action, "outcome": r.outcome,
         "code": r.code, "client": r.client, "job": r.job, "detail": r.detail}
        for r in query
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    p = printable  # a code, client or detail can be what a stranger typed at the kiosk or a printer answered
    for r in rows:
        print(f"{p(r['at'])}  {p(r['action']):15}  {p(r['outcome']):19}  {p(r['code'] or '-'):10}  "
              f"{p(r['client'] or '-'):15}  {p(r['job'])} {p(r['detail'])}".rstrip())
    return 0


def cmd_public_key(config: EdgeConfig, args: argparse.Namespace) -> int:
    """Print the entry the cloud's key store needs; the private key never leaves the node."""
    from kiosk.viewer_token import KeyFileError, load_or_create_key, public_key_entry

    try:
        key = load_or_create_key(config.data_dir, config.path(config.kiosk.token_key_file))
    except KeyFileError as exc:
        print(f"edge kiosk public-key: {printable(exc)}", file=sys.stderr)
        return 1
    print(public_key_entry(key, config.node.id, printable(config.node.name)), end="")
    return 0


def cmd_rotate_key(config: EdgeConfig, args: argparse.Namespace) -> int:
    """A new signing key for new tokens; the cloud keeps the old public key until its tokens expire."""
    from kiosk.viewer_token import KeyFileError, key_id, public_key_entry, rotate_key

    try:
        key, retired = rotate_key(config.data_dir, config.path(config.kiosk.token_key_file))
    except (KeyFileError, OSError) as exc:
        print(f"edge kiosk rotate-key: {printable(exc)}", file=sys.stderr)
        return 1
    print(f"# new key {key_id(key.public_key())}: register it with the cloud, then restart the kiosk;"
          f" keep the old public key registered for {config.kiosk.token_days} days"
          + (f" (old private key kept as {printable(retired)})" if retired else ""))
    print(public_key_entry(key, config.node.id, printable(config.node.name)), end="")
    return 0


def cmd_catalog_check(config: EdgeConfig, args: argparse.Namespace) -> int:
    """What a clinic's reviewer needs: per language, the drafts still to read, and what is broken.

    Missing keys, keys English does not have and changed {placeholders} are errors (exit 1): the
    kiosk would show English, or fail to fill a message. Drafts are not errors: they are the list
    of messages a native speaker has yet to confirm. The clinic's own texts in edge.toml
    (collect_at, exam names) that lack a kiosk language are listed too.
    """
    from kiosk.i18n import CATALOG_DIR, SOURCE_LANGUAGE, check_catalog
    from kiosk.patient_texts import PatientTexts

    languages = args.lang or [lang for lang in config.kiosk.languages if lang != SOURCE_LANGUAGE]
    files = [Path(f) for f in args.file] or [CATALOG_DIR / f"{lang}.toml" for lang in languages]
    broken = 0
    for path in files:
        report = check_catalog(path)
        p = printable
        print(f"{p(report.language)} ({p(path)}): {report.total} messages, {len(report.drafts)} drafts to review, "
              f"{len(report.missing)} missing, {len(report.unknown)} unknown, {len(report.bad_placeholders)} with "
              f"changed placeholders" + (f", unreadable: {p(report.error)}" if report.error else ""))
        for label, keys in (("missing (the kiosk shows English)", report.missing),
                            ("unknown to en.toml (misspelt?)", report.unknown),
                            ("placeholders differ from en.toml", report.bad_placeholders)):
            for key in keys:
                print(f"  {label}: {p(key)}")
        if args.drafts:
            for key in report.drafts:
                print(f"  draft: {p(key)} = {p(report.texts.get(key, ''))}")
        broken += bool(report.missing or report.unknown or report.bad_placeholders or report.error)
    for line in PatientTexts.from_config(config).untranslated(list(config.kiosk.languages)):
        print(f"edge.toml {printable(line)}")
    return 1 if broken else 0


def add_commands(sub: Any) -> None:
    kiosk = sub.add_parser("kiosk", help="patient kiosk: reprints, slips, audit log")
    ksub = kiosk.add_subparsers(dest="kiosk_command", required=True, metavar="KIOSK_COMMAND")
    reprint = ksub.add_parser("allow-reprint", help="let a patient print their report again (and unlock the code)")
    reprint.add_argument("code", help="the slip code (10 digits under the barcode)")
    reprint.add_argument("--count", type=int, default=1, choices=range(1, 11), metavar="N", help="extra prints (1-10)")
    reprint.add_argument("--by", default="technician", help="who allowed it, for the audit log")
    reprint.set_defaults(func=cmd_allow_reprint)
    issue = ksub.add_parser("issue-ticket", help="make a slip code + PIN for a visit (the console does this at registration)")
    issue.add_argument("--accession", required=True, help="the visit's accession number, as the X-ray will carry it")
    issue.add_argument("--name", required=True, help="the patient's name, printed on the report")
    issue.add_argument("--exam", default="", help="the exam, e.g. 'Chest X-ray'")
    issue.add_argument("--slip", help="write the slip PDF here")
    issue.add_argument("--lang", default="en", choices=("en", "zu", "xh", "af", "st"), help="slip language")
    issue.add_argument("--json", action="store_true", help="machine-readable output")
    issue.set_defaults(func=cmd_issue_ticket)
    audit = ksub.add_parser("audit", help="the kiosk's audit log: lookups and prints (never PINs)")
    audit.add_argument("--code", help="one slip's entries")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--json", action="store_true", help="machine-readable output")
    audit.set_defaults(func=cmd_audit)
    public = ksub.add_parser("public-key", help="print this node's film-link public key (and key id) to register with the cloud")
    public.set_defaults(func=cmd_public_key)
    rotate = ksub.add_parser("rotate-key", help="make a new film-link signing key (new QR tokens use it); prints its public key")
    rotate.set_defaults(func=cmd_rotate_key)
    check = ksub.add_parser("catalog-check", help="the kiosk's translations: drafts to review, missing or unknown "
                                                  "messages (exit 1 when a catalog is broken)")
    check.add_argument("--lang", action="append", choices=("zu", "xh", "af", "st", "en"),
                       help="only this language (repeatable); default: every kiosk language but English")
    check.add_argument("--file", action="append", default=[], metavar="PATH",
                       help="check this catalog file instead (a corrected copy before it is installed)")
    check.add_argument("--drafts", action="store_true", help="also print each draft message's text")
    check.set_defaults(func=cmd_catalog_check)
