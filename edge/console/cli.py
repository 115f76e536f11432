"""``edge user …``: console accounts from the command line (the first admin is made here)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from edge.node.config import EdgeConfig
from edge.terminal import printable


def add_commands(sub: Any) -> None:
    user = sub.add_parser("user", help="console accounts: add, list, unlock, passwd, disable, enable")
    users = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = users.add_parser("add", help="add a console user (the first admin is made this way)")
    add.add_argument("name")
    add.add_argument("--role", choices=("technician", "admin"), default="technician")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.set_defaults(func=cmd_add)
    listing = users.add_parser("list", help="console users with role and state")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)
    for name, helptext in (("unlock", "end the login delays wrong passwords put on this user's name (every address)"),
                           ("disable", "stop a user logging in (ends their sessions)"),
                           ("enable", "let a disabled user log in again")):
        p = users.add_parser(name, help=helptext)
        p.add_argument("name")
        p.set_defaults(func=cmd_state, action=name)
    passwd = users.add_parser("passwd", help="set a user's password (ends their sessions)")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true")
    passwd.set_defaults(func=cmd_passwd)


def _open_store(config: EdgeConfig) -> None:
    from edge.store.db import open_database

    open_database(config.data_dir)


def _read_password(from_stdin: bool) -> str | None:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        print("edge user: the two passwords differ", file=sys.stderr)
        return None
    return first


def cmd_add(config: EdgeConfig, args: argparse.Namespace) -> int:
    from edge.console.accounts import AccountError, add_user

    password = _read_password(args.password_stdin)
    if password is None:
        return 2
    _open_store(config)
    try:
        add_user(args.name, args.role, password, by="cli")
    except AccountError as exc:
        print(f"edge user add: {printable(exc)}", file=sys.stderr)
        return 2
    print(f"user {args.name.strip().lower()} added ({args.role}); log in at the console, port {config.console.port}")
    return 0


def cmd_list(config: EdgeConfig, args: argparse.Namespace) -> int:
    from edge.console.accounts import list_users

    _open_store(config)
    rows = list_users()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no console users yet: make the first admin with `edge user add NAME --role admin` "
              "(in a clone: ./scripts/edge user add NAME --role admin)")
    for r in rows:
        state = "disabled" if r["disabled"] else "active"
        slowed = f"  (wrong passwords from {r['wrong_login_addresses']} address(es); edge user unlock {r['name']})" \
            if r["wrong_login_addresses"] else ""
        print(f"{printable(r['name']):20} {printable(r['role']):11} {state:9} "
              f"last login {printable(r['last_login'] or 'never')}{printable(slowed)}")
    return 0


def cmd_state(config: EdgeConfig, args: argparse.Namespace) -> int:
    from edge.console.accounts import AccountError, set_disabled, unlock_user

    _open_store(config)
    name = printable(args.name)
    try:
        if args.action == "unlock":
            ended = unlock_user(args.name)
        else:
            set_disabled(args.name, args.action == "disable")
    except AccountError as exc:
        print(f"edge user {args.action}: {printable(exc)}", file=sys.stderr)
        return 1
    print(f"user {name}: {args.action}d" if args.action != "unlock"
          else f"user {name}: {ended} login delay(s) ended; they can try again from every address")
    return 0


def cmd_passwd(config: EdgeConfig, args: argparse.Namespace) -> int:
    from edge.console.accounts import AccountError, set_password

    password = _read_password(args.password_stdin)
    if password is None:
        return 2
    _open_store(config)
    try:
        set_password(args.name, password)
    except AccountError as exc:
        print(f"edge user passwd: {printable(exc)}", file=sys.stderr)
        return 1
    print(f"password of {printable(args.name)} changed; their sessions and login delays are ended")
    return 0
