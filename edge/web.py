"""What the console and the kiosk share on the web: templates, security headers, CSRF, the client's address.

Both apps once carried their own copy of this; a fix made in one was missed in the other.
Pages come from Jinja2 templates with autoescape on, so a value from a DICOM header, a
form or the cloud is escaped unless a template says otherwise — not only when each value
remembers to call escape.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware  # aiohttp's own: app.middlewares holds its Middleware protocol
from jinja2.ext import Extension
from markupsafe import Markup

# One policy for both apps, the stricter of what each sent: nothing from elsewhere (no inline
# script, no data: images), forms post only here, and no other site may frame a page.
CONTENT_SECURITY_POLICY = "default-src 'self'; form-action 'self'; frame-ancestors 'none'"
SECURITY_HEADERS: Mapping[str, str] = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
}
CSRF_FIELD = "csrf"  # the hidden form field every POST carries


# ---------------------------------------------------------------------- templates


class OneLine(Extension):
    """Drops each line break and the indentation after it from a template's source.

    Templates are written one element per line for their reader; the page stays the one
    line of HTML it always was, so no space appears between inline elements (buttons, links)
    that the markup never had. Text that needs a space keeps it on one line.
    """

    _BREAK = re.compile(r"\n[ \t]*")

    def preprocess(self, source: str, name: str | None, filename: str | None = None) -> str:
        return self._BREAK.sub("", source)


def escape_value(value: object) -> object:
    """Every ``{{ value }}`` escaped as ``html.escape`` does (``&quot;``, ``&#x27;``), the spelling the
    pages always had; markup a template or macro made (``__html__``) passes as it is."""
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(str(value), quote=True))


def setup_templates(app: web.Application, directory: Path, **globals_: Any) -> jinja2.Environment:
    """Jinja2 for ``app`` from ``directory``: autoescape for .html, a missing value is an error, not ""."""
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(directory),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=True),
        undefined=jinja2.StrictUndefined,
        extensions=[OneLine],
        finalize=escape_value,
        default_helpers=False,
    )
    env.globals.update(globals_)
    return env


def render(template: str, request: web.Request, status: int = 200, **context: Any) -> web.Response:
    """A page from ``template``; ``text/html; charset=utf-8``."""
    return aiohttp_jinja2.render_template(template, request, context, status=status)


def render_fragment(template: str, request: web.Request, **context: Any) -> str:
    """A piece of a page (a table row the page's script swaps in) as HTML text."""
    return aiohttp_jinja2.render_string(template, request, context)


# ---------------------------------------------------------------------- headers


def security_headers(cacheable: Callable[[str], bool] = lambda path: path.startswith("/static/")) -> Middleware:
    """Every answer, pages and errors alike, is not framed, not sniffed, not referred elsewhere,
    and not cached unless ``cacheable(path)`` (Back must not show the last patient)."""

    def stamp(response: web.StreamResponse, path: str) -> None:
        if not cacheable(path):
            response.headers["Cache-Control"] = "no-store"
        response.headers.update(SECURITY_HEADERS)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # redirects and refusals raised by a handler
            stamp(exc, request.path)
            raise
        stamp(response, request.path)
        return response

    return middleware


# ---------------------------------------------------------------------- client and CSRF


def client_address(request: web.Request) -> str:
    """The peer's address as the audit log and the login budget record it (no proxy is trusted)."""
    return request.remote or "unknown"


def client_ip(request: web.Request) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address for a network rule; an IPv4 client on a dual-stack socket
    (``::ffff:a.b.c.d``) counts as its IPv4 address. None when there is none."""
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


def csrf_ok(expected: str, given: object) -> bool:
    """Whether a form's token matches, compared in constant time."""
    return bool(expected) and isinstance(given, str) and bool(given) and hmac.compare_digest(
        expected.encode(), given.encode())


def kept_csrf_token(current: str) -> str:
    """``current`` if it looks like a token this module issued, else a new one: a browser's
    second tab keeps the token of its first, so neither form goes stale."""
    return current if 20 <= len(current) <= 64 and current.replace("-", "").replace("_", "").isalnum() \
        else new_csrf_token()
