"""``edge kiosk …`` prints what a technician or a printer typed: never a control code that drives the terminal.

``--by`` of allow-reprint lands in the audit's client column as typed (a name pasted from a
chat, say); the text listing of ``edge kiosk audit`` must show it inert, while ``--json`` keeps
the value as stored.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import edge_cli, write_config

HOSTILE = "\x1b[2J\x9b31m\u202e"
CONTROLS = {*range(0x00, 0x20), *range(0x7F, 0xA0), 0x202E} - {0x0A}  # newline: only where the CLI puts it


def test_kiosk_audit_listing_and_messages_are_inert(tmp_path: Path) -> None:
    config = write_config(tmp_path / "edge.toml", tmp_path / "var")
    issued = json.loads(edge_cli(config, "kiosk", "issue-ticket", "--accession", "ACC-77", "--name", "Dlamini^Thandi",
                                 "--json").stdout)
    edge_cli(config, "kiosk", "allow-reprint", issued["code"], "--by", "Sister " + HOSTILE)

    listing = edge_cli(config, "kiosk", "audit").stdout
    assert issued["code"] in listing and "reprint_allowed" in listing  # both rows are listed ...
    assert "Sister ?[2J?31m?" in listing  # ... the technician's name shown, its codes inert
    assert not any(ord(c) in CONTROLS for c in listing)
    assert listing.count("\n") == 2  # one line per row

    rows = json.loads(edge_cli(config, "kiosk", "audit", "--json").stdout)
    assert any(r["client"] == "Sister " + HOSTILE for r in rows)  # kept as typed; json.dumps escapes it

    refused = edge_cli(config, "kiosk", "allow-reprint", "12345\x1b[2J", check=False)
    assert refused.returncode == 1 and "not a slip code" in refused.stderr
    assert "\x1b" not in refused.stderr
