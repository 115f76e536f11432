"""HTTPS for the console: provisioned certificate, https only, Secure cookies, clear start-up errors."""

from __future__ import annotations

import http.client
import re
import ssl
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from edge.node.config import load_config
from edge.console.tls import ConsoleTlsError, console_ssl_context, make_self_signed
from tests.conftest import EdgeNode, edge_cli, write_config
from tests.console.conftest import QUIET, TECH, TECH_PASSWORD
from tests.console.helpers import add_user


def _https(node: EdgeNode, ca: Path, host: str = "127.0.0.1") -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=str(ca))  # the provisioned certificate is the CA: verified, not skipped
    return http.client.HTTPSConnection(host, node.console_port, context=context, timeout=30)


@pytest.fixture
def tls_node(node_factory: Any) -> EdgeNode:
    node: EdgeNode = node_factory(("run",), **QUIET, kiosk={"bind_address": "127.0.0.1"})
    made = edge_cli(node.config, "provision", "--console-tls", "--console-tls-host", "edge.clinic.lan")
    assert "set [console] tls_cert" in made.stdout and "set [console] tls_key" in made.stdout
    add_user(node, TECH, TECH_PASSWORD)
    return node.start()


def test_a_provisioned_node_serves_the_console_over_https_only_with_secure_cookies(tls_node: EdgeNode) -> None:
    config = load_config(tls_node.config)
    cert, key = config.path(config.console.tls_cert), config.path(config.console.tls_key)
    assert cert is not None and key is not None and cert.parent == tls_node.config.parent
    assert (key.stat().st_mode & 0o777) == 0o600

    conn = _https(tls_node, cert)
    conn.request("GET", "/login")
    page = conn.getresponse()
    body = page.read().decode()
    assert page.status == 200 and "Log in" in body
    login_cookie = page.getheader("Set-Cookie", "")
    assert "edge_console_login=" in login_cookie and "Secure" in login_cookie
    token = login_cookie.split(";")[0].split("=", 1)[1]
    csrf = re.search(r'name="csrf" value="([^"]+)"', body).group(1)  # type: ignore[union-attr]
    form = urllib.parse.urlencode({"user": TECH, "password": TECH_PASSWORD, "csrf": csrf})
    conn.request("POST", "/login", body=form, headers={
        "Content-Type": "application/x-www-form-urlencoded", "Cookie": f"edge_console_login={token}"})
    answer = conn.getresponse()
    answer.read()
    session_cookie = [v for k, v in answer.getheaders() if k.lower() == "set-cookie" and v.startswith("edge_console=")]
    assert answer.status == 303 and session_cookie and "Secure" in session_cookie[0] and "HttpOnly" in session_cookie[0]
    conn.close()

    # The certificate covers the names it was made for (checked by the TLS client, not by us).
    named = _https(tls_node, cert, "localhost")
    named.request("GET", "/healthz")
    assert named.getresponse().status in (200, 503)
    named.close()

    # Plain http on the same port gets no page: a password cannot be sent in clear by mistake.
    plain = http.client.HTTPConnection("127.0.0.1", tls_node.console_port, timeout=30)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", "/login")
        plain.getresponse().read()
    plain.close()

    # Provisioning again keeps the certificate (browsers that trusted it stay happy).
    before = cert.read_bytes()
    assert "nothing changed" in edge_cli(tls_node.config, "provision", "--console-tls").stdout
    assert cert.read_bytes() == before


def _config(tmp_path: Path, **console: str) -> Any:
    return load_config(write_config(tmp_path / "edge.toml", tmp_path / "var", console=console))


def test_a_missing_or_wrong_certificate_names_the_key(tmp_path: Path) -> None:
    assert console_ssl_context(_config(tmp_path)) is None  # the shipped default: plain http
    with pytest.raises(ConsoleTlsError, match=r"\[console\] tls_key: must be set too"):
        console_ssl_context(_config(tmp_path, tls_cert="console.crt"))
    with pytest.raises(ConsoleTlsError, match=r"\[console\] tls_cert: .*console.crt not found.*--console-tls"):
        console_ssl_context(_config(tmp_path, tls_cert="console.crt", tls_key="console.key"))
    make_self_signed(tmp_path / "console.crt", tmp_path / "console.key", "clinic-0042", ["127.0.0.1"])
    assert isinstance(console_ssl_context(_config(tmp_path, tls_cert="console.crt", tls_key="console.key")),
                      ssl.SSLContext)
    (tmp_path / "garbage.key").write_text("not a key\n")
    with pytest.raises(ConsoleTlsError, match=r"\[console\] tls_key: .*garbage.key is not a PEM file"):
        console_ssl_context(_config(tmp_path, tls_cert="console.crt", tls_key="garbage.key"))
    make_self_signed(tmp_path / "other.crt", tmp_path / "other.key", "elsewhere", ["127.0.0.1"])
    with pytest.raises(ConsoleTlsError, match=r"do not make a usable pair"):
        console_ssl_context(_config(tmp_path, tls_cert="console.crt", tls_key="other.key"))


def test_the_console_does_not_start_on_a_missing_certificate_and_says_which_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "edge.toml", tmp_path / "var",
                          console={"tls_cert": "absent.crt", "tls_key": "absent.key"})
    result = subprocess.run([sys.executable, "-m", "edge", "--config", str(config), "serve", "console"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "[console] tls_cert" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr
