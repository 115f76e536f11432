"""The cloud-film token, both sides: packed and signed on the node, parsed and checked in the cloud.

A compact binary token (kiosk/TOKEN.md), not a JWT: an EdDSA JWT naming a full Study
Instance UID is ~330 characters and puts the QR at version 14; this one is ~155 and keeps
it at version 9-10 (error correction M). The signature is plain Ed25519 (RFC 8032) from
the ``cryptography`` library. Only the standard library and ``cryptography`` are used, so
this same file runs inside Orthanc's Python plugin on the cloud, where the node's
packages are not installed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

VERSION = 1
SIGNING_CONTEXT = b"clinic-edge cloud-film token v1\n"  # signed, never sent: no other message verifies as a token
SIGNATURE_BYTES = 64
KEY_ID_BYTES = 4
MAX_NODE_ID = 63
MAX_UID = 64
_HEAD = struct.Struct(">B4sIIB")  # version, key id, iat, exp, node id length
_UID_NIBBLE = {**{str(d): d for d in range(10)}, ".": 0xA}
_NIBBLE_UID = {v: k for k, v in _UID_NIBBLE.items()}
_PAD = 0xF


class TokenError(Exception):
    """A token that is malformed, forged, from an unknown key, for another study, or expired."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # one word for the cloud's access log: malformed, unknown_key, bad_signature, expired, …


@dataclass(frozen=True)
class TokenClaims:
    node_id: str
    key_id: str  # 8 hex digits
    study_uid: str
    issued_at: int  # Unix seconds, UTC
    expires_at: int


@dataclass(frozen=True)
class RegisteredKey:
    """One node public key the cloud holds; ``retired_at`` set: tokens issued later with it are refused."""

    node_id: str
    key_id: str
    public_key: Ed25519PublicKey
    retired_at: int | None = None


KeyStore = Mapping[tuple[str, str], RegisteredKey]  # by (node id, key id)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: str) -> bytes:
    if not text or len(text) % 4 == 1 or not all(c.isalnum() or c in "-_" for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """The first 4 bytes of SHA-256 of the raw public key, as 8 hex digits: tells a node's keys apart."""
    return hashlib.sha256(raw_public_key(key)).digest()[:KEY_ID_BYTES].hex()


def pack_uid(uid: str) -> bytes:
    """A DICOM UID (digits and dots) in half a byte per character; an odd length ends with 0xF."""
    if not 0 < len(uid) <= MAX_UID or any(c not in _UID_NIBBLE for c in uid):
        raise ValueError(f"not a DICOM UID (digits and dots, at most {MAX_UID}): {uid[:80]!r}")
    nibbles = [_UID_NIBBLE[c] for c in uid] + ([_PAD] if len(uid) % 2 else [])
    return bytes(hi << 4 | lo for hi, lo in zip(nibbles[::2], nibbles[1::2]))


def unpack_uid(data: bytes) -> str:
    chars = []
    for i, byte in enumerate(data):
        for j, nibble in enumerate((byte >> 4, byte & 0xF)):
            if nibble == _PAD and i == len(data) - 1 and j == 1:
                break
            if nibble not in _NIBBLE_UID:
                raise ValueError("bad UID nibble")
            chars.append(_NIBBLE_UID[nibble])
    uid = "".join(chars)
    if not uid or len(uid) > MAX_UID:
        raise ValueError("bad UID length")
    return uid


def make_token(private_key: Ed25519PrivateKey, node_id: str, study_uid: str, issued_at: int, expires_at: int) -> str:
    """The signed token for one study: base64url of the packed claims and their Ed25519 signature."""
    node = node_id.encode("ascii")
    if not 0 < len(node) <= MAX_NODE_ID:
        raise ValueError(f"node id must be 1-{MAX_NODE_ID} ASCII characters")
    kid = bytes.fromhex(key_id(private_key.public_key()))
    body = _HEAD.pack(VERSION, kid, issued_at, expires_at, len(node)) + node + pack_uid(study_uid)
    return b64(body + private_key.sign(SIGNING_CONTEXT + body))


def read_claims(token: str) -> tuple[TokenClaims, bytes, bytes]:
    """The claims as written, the signed body and the signature; nothing is checked but the layout."""
    try:
        raw = unb64(token)
    except (ValueError, binascii.Error):
        raise TokenError("malformed", "token is not base64url") from None
    body, signature = raw[:-SIGNATURE_BYTES], raw[-SIGNATURE_BYTES:]
    if len(body) < _HEAD.size + 2:
        raise TokenError("malformed", "token is too short")
    version, kid, iat, exp, node_len = _HEAD.unpack_from(body)
    if version != VERSION:
        raise TokenError("malformed", f"token version {version} is not {VERSION}")
    node_end = _HEAD.size + node_len
    if not 0 < node_len <= MAX_NODE_ID or len(body) <= node_end:
        raise TokenError("malformed", "token's node id does not fit")
    try:
        node_id = body[_HEAD.size:node_end].decode("ascii")
        study_uid = unpack_uid(body[node_end:])
    except (UnicodeDecodeError, ValueError):
        raise TokenError("malformed", "token's node id or study is not readable") from None
    return TokenClaims(node_id, kid.hex(), study_uid, iat, exp), body, signature


def verify_token(token: str, keys: KeyStore, study_uid: str | None = None, now: float | None = None,
                 leeway_s: int = 60) -> TokenClaims:
    """Check layout, the registered key (node id + key id), the signature, expiry and (if given) the study."""
    claims, body, signature = read_claims(token)
    registered = keys.get((claims.node_id, claims.key_id))
    if registered is None:
        raise TokenError("unknown_key", f"no public key {claims.key_id} registered for node {claims.node_id}")
    try:
        registered.public_key.verify(signature, SIGNING_CONTEXT + body)
    except InvalidSignature:
        raise TokenError("bad_signature", "bad signature") from None
    moment = time.time() if now is None else now
    if moment >= claims.expires_at + leeway_s:
        raise TokenError("expired", "token expired")
    if claims.issued_at > moment + leeway_s:
        raise TokenError("not_yet_valid", "token issued in the future")
    if registered.retired_at is not None and claims.issued_at > registered.retired_at:
        raise TokenError("retired_key", f"key {claims.key_id} was retired before this token was issued")
    if study_uid is not None and claims.study_uid != study_uid:
        raise TokenError("other_study", "token is for another study")
    return claims


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """A public key as registered: base64url (or base64) of the 32 raw bytes."""
    try:
        raw = unb64(text.strip().rstrip("=").replace("+", "-").replace("/", "_"))
    except (ValueError, binascii.Error):
        raise ValueError("public_key is not base64") from None
    if len(raw) != 32:
        raise ValueError("public_key must be 32 bytes (an Ed25519 key)")
    return Ed25519PublicKey.from_public_bytes(raw)


def read_keys_file(path: Path) -> dict[tuple[str, str], RegisteredKey]:
    """The cloud's key store: ``[[key]]`` tables with node, key_id, public_key and optional retired_at (Unix s).

    Raises ValueError naming the entry that is wrong; a key whose key_id does not match
    its public key is refused, so a typo cannot silently register the wrong key.
    """
    data = tomllib.loads(Path(path).read_text("utf-8"))
    keys: dict[tuple[str, str], RegisteredKey] = {}
    for n, entry in enumerate(data.get("key", []), start=1):
        where = f"{path}: key #{n}"
        try:
            node, kid, text = str(entry["node"]), str(entry["key_id"]).lower(), str(entry["public_key"])
        except (KeyError, TypeError):
            raise ValueError(f"{where}: needs node, key_id and public_key") from None
        public = public_key_from_text(text)
        if key_id(public) != kid:
            raise ValueError(f"{where}: key_id {kid} does not match the public key (it is {key_id(public)})")
        retired = entry.get("retired_at")
        if retired is not None and not isinstance(retired, int):
            raise ValueError(f"{where}: retired_at must be Unix seconds")
        keys[(node, kid)] = RegisteredKey(node, kid, public, retired)
    return keys
