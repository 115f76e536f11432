"""How the node reaches the cloud: credentials from the secrets file, TLS, timeouts, one session."""

from __future__ import annotations

import base64
import ssl
import stat
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:  # the whole config is the roof's; a part only reads it
    from edge.node.config import EdgeConfig


class CloudSetupError(Exception):
    """The cloud settings cannot work (secrets file readable by others, bad certificate…)."""


def load_auth_headers(path: Path | None) -> dict[str, str]:
    """``Authorization`` from the secrets file: ``token = "…"`` (Bearer) or ``username``/``password`` (Basic).

    The file must not be readable by group or others: a leaked token lets anyone
    write into the regional PACS.
    """
    if path is None:
        return {}
    try:
        mode = path.stat().st_mode
        data = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CloudSetupError(f"[cloud] secrets_file: {path} not found") from None
    except OSError as exc:
        raise CloudSetupError(f"[cloud] secrets_file: cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CloudSetupError(f"[cloud] secrets_file: {path} is not valid TOML: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CloudSetupError(
            f"[cloud] secrets_file: {path} is readable by others (mode {stat.S_IMODE(mode):o}); run: chmod 600 {path}"
        )
    unknown = set(data) - {"token", "username", "password"}
    if unknown:
        raise CloudSetupError(f"[cloud] secrets_file: unknown key(s) {', '.join(sorted(unknown))} in {path}")
    if isinstance(data.get("token"), str) and data["token"]:
        return {"Authorization": f"Bearer {data['token']}"}
    if isinstance(data.get("username"), str) and isinstance(data.get("password"), str):
        pair = f"{data['username']}:{data['password']}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}  # RFC 7617
    raise CloudSetupError(f"[cloud] secrets_file: {path} needs token, or username and password")


def ssl_context(config: EdgeConfig) -> ssl.SSLContext | bool:
    """TLS as [cloud] says: verification on unless switched off, optional CA bundle and client cert."""
    cfg = config.cloud
    ca_bundle, cert, key = config.path(cfg.ca_bundle), config.path(cfg.client_cert), config.path(cfg.client_key)
    if cfg.verify_tls and not (ca_bundle or cert):
        return True
    try:
        context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
        if cert:
            context.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise CloudSetupError(f"[cloud] TLS files: {exc}") from None
    if not cfg.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def open_session(config: EdgeConfig) -> aiohttp.ClientSession:
    """The node's one client session to the cloud; no total timeout (big uploads on slow links)."""
    cfg = config.cloud
    timeout = aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s)
    # A fresh connection per request: between two uploads a slot compresses the next image,
    # and a server that closes idle keep-alive connections (Orthanc does, quickly) would
    # otherwise break the next request on a reused socket. One handshake per batch is cheap.
    connector = aiohttp.TCPConnector(ssl=ssl_context(config), limit=config.sync.concurrency + 4, force_close=True)
    return aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False)
