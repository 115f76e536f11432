"""Driving the console from a test: a logged-in HTTP client (urllib, cookies) and DCMTK findscu."""

from __future__ import annotations

import http.cookiejar
import json
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pydicom import dcmread

from tests.node import DCMTK, EdgeNode

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class ConsoleClient:
    """What a browser does, minus the rendering: cookies, CSRF tokens from the forms."""

    def __init__(self, node: EdgeNode) -> None:
        self.base = f"http://127.0.0.1:{node.console_port}"
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect())
        self.csrf = ""

    def request(self, method: str, path: str, data: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, method=method)
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, resp.read().decode(errors="replace"), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace"), dict(exc.headers)

    def get(self, path: str) -> tuple[int, str]:
        status, text, _ = self.request("GET", path)
        found = _CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return status, text

    def post(self, path: str, data: dict[str, str], csrf: bool = True) -> tuple[int, str, dict[str, str]]:
        return self.request("POST", path, {**data, **({"csrf": self.csrf} if csrf else {})})

    def login(self, user: str, password: str) -> int:
        self.get("/login")
        status, _, _ = self.post("/login", {"user": user, "password": password})
        if status == 303:
            self.get("/")
        return status

    def register(self, **form: str) -> int:
        """Register a visit; returns the new order id."""
        self.get("/register")
        values = {"sex": "F", "exam": "Chest X-ray", "language": "en", **form}
        status, text, headers = self.post("/register", values)
        assert status == 303, f"registration refused ({status}): {re.findall(r'field-error[^>]*>([^<]*)', text)}"
        return int(headers["Location"].split("/")[2])

    def today(self) -> dict[str, Any]:
        status, text, _ = self.request("GET", "/api/today")
        assert status == 200, status
        return dict(json.loads(text))


def add_user(node: EdgeNode, name: str, password: str, role: str = "technician") -> None:
    import sys

    subprocess.run([sys.executable, "-m", "edge", "--config", str(node.config), "user", "add", name, "--role", role,
                    "--password-stdin"], input=password + "\n", text=True, check=True, capture_output=True, timeout=60)


def findscu(node: EdgeNode, *keys: str, calling: str = "DR", verbosity: str = "-v") -> subprocess.CompletedProcess[str]:
    """DCMTK findscu -W (worklist) against the node, answers written as rsp*.dcm under ``node.tmp/find``.

    ``verbosity="-d"`` also prints a failure's Error Comment (what a DR shows beside the status).
    """
    out = node.tmp / "find"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.dcm"):
        old.unlink()
    args = [str(DCMTK / "findscu"), "-W", verbosity, "-X", "-od", str(out), "-aet", calling, "-aec", node.ae_title]
    for key in keys:
        args += ["-k", key]
    return subprocess.run([*args, "127.0.0.1", str(node.port)], capture_output=True, text=True, errors="replace",
                          timeout=60)


def find_answers(node: EdgeNode) -> list[Any]:
    return [dcmread(p) for p in sorted((node.tmp / "find").glob("*.dcm"))]


def set_attrs(path: Path, **values: str) -> None:
    ds = dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)
