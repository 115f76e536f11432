"""A newcomer's first admin: ``./scripts/edge`` works from a fresh clone's shell, and the login page says how
to make the first account while there is none (and nothing about accounts once there is one)."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from typing import Any

from tests.node import REPO

WRAPPER = REPO / "scripts" / "edge"
HINT = "No account exists yet"


def login_page(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=10) as response:
        return str(response.read().decode())


def wrapper(*args: str, cwd: Any, password: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """The command as the README spells it, run by bash from a folder that is not the clone."""
    environment = {k: v for k, v in os.environ.items() if k != "EDGE_CONFIG"} | env
    return subprocess.run([str(WRAPPER), *args], input=password, capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=environment, check=False)


def test_login_page_says_how_to_make_the_first_admin_until_one_exists(node_factory: Any) -> None:
    node = node_factory(("serve", "dicom", "console")).start()
    page = login_page(node.console_port)
    assert HINT in page and "./scripts/edge user add admin --role admin" in page

    made = wrapper("user", "add", "admin", "--role", "admin", "--password-stdin", cwd=node.tmp.parent,
                   password="first-admin-pass\n", EDGE_CONFIG=str(node.config))
    assert made.returncode == 0, made.stderr
    assert "user admin added (admin)" in made.stdout

    page = login_page(node.console_port)
    assert HINT not in page and "scripts/edge" not in page and "admin" not in page  # no account details once there is one
    assert 'id="login-form"' in page


def test_wrapper_reads_the_config_in_the_current_folder_and_says_why_it_fails(tmp_path: Any) -> None:
    from tests.node import write_config

    write_config(tmp_path / "edge.toml", tmp_path / "var")
    made = wrapper("user", "add", "nomsa", "--password-stdin", cwd=tmp_path, password="tech-pass-123\n")
    assert made.returncode == 0, made.stderr
    listed = wrapper("user", "list", cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout.split()[:2] == ["nomsa", "technician"]
    assert (tmp_path / "var").is_dir()  # the folder's own edge.toml, not the clone's

    short = wrapper("user", "add", "sipho", "--password-stdin", cwd=tmp_path, password="short\n")
    assert short.returncode == 2 and "at least 8 characters" in short.stderr and "Traceback" not in short.stderr
