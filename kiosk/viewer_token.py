"""The cloud-film link: a viewer URL with a signed, expiring token (see kiosk/TOKEN.md).

The token is a JWT (RFC 7519) signed HS256 with the node's key, so the cloud viewer can
check it with any JWT library: it names the one study it opens and when it stops working.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from kiosk.const import KIOSK_DIR, TOKEN_KEY_NAME

KEY_BYTES = 32


class TokenError(Exception):
    """A token that is malformed, forged, for another study, or expired."""


class KeyFileError(Exception):
    """The key file is unreadable, too short, or readable by others."""


@dataclass(frozen=True)
class TokenClaims:
    study_uid: str
    node_id: str
    issued_at: int
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("token is not base64url") from None


def key_id(key: bytes) -> str:
    """A short fingerprint of the key, so the cloud can tell rotated keys apart."""
    return hashlib.sha256(key).hexdigest()[:16]


def load_or_create_key(data_dir: Path, key_file: Path | None = None) -> bytes:
    """The node's signing key: ``key_file`` if configured (hex or raw, mode 600), else one under the data dir.

    The data-dir key is created at first use with mode 600, atomically, so two processes
    starting together agree on one key.
    """
    path = key_file or Path(data_dir) / KIOSK_DIR / TOKEN_KEY_NAME
    if key_file is None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(KEY_BYTES) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read token key: {exc.strerror}") from None
    if mode & 0o077:
        raise KeyFileError(f"{path}: token key is readable by others (chmod 600 it)")
    text = raw.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) < 16:
        raise KeyFileError(f"{path}: token key is shorter than 16 bytes")
    return key


def make_token(key: bytes, study_uid: str, node_id: str, days: int, now: float | None = None) -> str:
    """A JWT (HS256) for one study, valid ``days`` from now."""
    issued = int(now if now is not None else time.time())
    header = {"alg": "HS256", "typ": "JWT", "kid": key_id(key)}
    claims = {"iss": node_id, "sub": study_uid, "iat": issued, "exp": issued + days * 86400, "scope": "study:view"}
    signing_input = f"{_b64(_json(header))}.{_b64(_json(claims))}"
    signature = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def verify_token(token: str, key: bytes, study_uid: str | None = None, now: float | None = None) -> TokenClaims:
    """Check signature, expiry and (if given) the study; raise TokenError saying what is wrong."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("token must have three dot-separated parts")
    header_b64, claims_b64, signature_b64 = parts
    expected = hmac.new(key, f"{header_b64}.{claims_b64}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _unb64(signature_b64)):
        raise TokenError("bad signature")
    try:
        header = json.loads(_unb64(header_b64))
        claims = json.loads(_unb64(claims_b64))
    except (ValueError, UnicodeDecodeError):
        raise TokenError("token parts are not JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise TokenError("token algorithm must be HS256")
    if not isinstance(claims, dict):
        raise TokenError("token claims are not an object")
    try:
        result = TokenClaims(str(claims["sub"]), str(claims["iss"]), int(claims["iat"]), int(claims["exp"]))
    except (KeyError, TypeError, ValueError):
        raise TokenError("token lacks sub, iss, iat or exp") from None
    if (now if now is not None else time.time()) >= result.expires_at:
        raise TokenError("token expired")
    if study_uid is not None and result.study_uid != study_uid:
        raise TokenError("token is for another study")
    return result


def viewer_url(template: str, study_uid: str, token: str) -> str:
    """The QR's URL: the configured template with the study UID and token filled in."""
    return template.format(study_uid=quote(study_uid, safe=""), token=quote(token, safe=""))


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")
