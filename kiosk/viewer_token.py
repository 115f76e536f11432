"""The cloud-film link: a short URL carrying a token signed with the node's Ed25519 key (kiosk/TOKEN.md).

The node keeps the private key (PEM, mode 600); the cloud holds only the public key,
registered by node id and key id (``edge kiosk public-key`` prints the entry).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from kiosk.cloud_film import film_token
from kiosk.cloud_film.film_token import RegisteredKey, TokenClaims, TokenError, key_id
from kiosk.const import KIOSK_DIR, TOKEN_KEY_NAME

if TYPE_CHECKING:
    from edge.node.config import EdgeConfig
    from edge.part import DoctorItem

__all__ = ["KeyFileError", "TokenClaims", "TokenError", "check_film_link", "key_id", "load_or_create_key",
           "make_token", "public_key_entry", "rotate_key", "verify_token", "viewer_url"]


class KeyFileError(Exception):
    """The key file is missing, unreadable, not an Ed25519 key, or readable by others."""


def key_path(data_dir: Path, key_file: Path | None = None) -> Path:
    return key_file or Path(data_dir) / KIOSK_DIR / TOKEN_KEY_NAME


def _write_new_key(path: Path) -> None:
    """A fresh key, mode 600 from the first byte; O_EXCL so two processes starting together keep one key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


def load_or_create_key(data_dir: Path, key_file: Path | None = None, create: bool | None = None) -> Ed25519PrivateKey:
    """The node's signing key: ``key_file`` if configured, else ``<data_dir>/kiosk/film-key.pem``.

    The data-dir key is made at first use; a configured file only when ``create`` is
    true (provisioning): a configured key that has gone missing is an error, not a
    silent new key the cloud has never heard of.
    """
    path = key_path(data_dir, key_file)
    if (create if create is not None else key_file is None) and not path.exists():
        _write_new_key(path)
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the film signing key: {exc.strerror}") from None
    if mode & 0o077:
        raise KeyFileError(f"{path}: film signing key is readable by others (chmod 600 it)")
    try:
        key = load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not a PEM private key (make one with `edge kiosk rotate-key`)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def rotate_key(data_dir: Path, key_file: Path | None = None) -> tuple[Ed25519PrivateKey, Path | None]:
    """A new key in place; the old one kept beside it as ``<name>.<key id>.retired`` (mode 600) for the record."""
    path = key_path(data_dir, key_file)
    retired: Path | None = None
    if path.exists():
        old = load_or_create_key(data_dir, key_file, create=False)
        retired = path.with_name(f"{path.name}.{key_id(old.public_key())}.retired")
        os.replace(path, retired)
    _write_new_key(path)
    return load_or_create_key(data_dir, key_file, create=False), retired


def make_token(key: Ed25519PrivateKey, study_uid: str, node_id: str, days: int, now: float | None = None) -> str:
    """A token for one study, valid ``days`` from now."""
    issued = int(time.time() if now is None else now)
    return film_token.make_token(key, node_id, study_uid, issued, issued + days * 86400)


def verify_token(token: str, keys: Ed25519PublicKey | Ed25519PrivateKey | Iterable[Ed25519PublicKey],
                 study_uid: str | None = None, now: float | None = None) -> TokenClaims:
    """Check a token against one or more of the node's keys (the cloud does the same by node id + key id)."""
    if isinstance(keys, Ed25519PrivateKey):
        keys = keys.public_key()
    publics = [keys] if isinstance(keys, Ed25519PublicKey) else list(keys)
    node_id = film_token.read_claims(token)[0].node_id  # the node's own keys: whatever node id it names
    store = {(node_id, key_id(k)): RegisteredKey(node_id, key_id(k), k) for k in publics}
    return film_token.verify_token(token, store, study_uid, now)


def viewer_url(template: str, study_uid: str, token: str) -> str:
    """The QR's URL: the configured template with the token (and, if the template has it, the study UID)."""
    return template.format(study_uid=quote(study_uid, safe=""), token=quote(token, safe=""))


def public_key_entry(key: Ed25519PrivateKey, node_id: str, node_name: str = "") -> str:
    """The TOML entry the cloud's key store takes (kiosk/cloud_film/README.md): append it to the keys file."""
    public = key.public_key()
    made = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    label = f" ({node_name})".replace("\n", " ") if node_name else ""
    return (f"# node {node_id}{label}, printed {made}\n[[key]]\nnode = \"{node_id}\"\nkey_id = \"{key_id(public)}\"\n"
            f"public_key = \"{film_token.b64(film_token.raw_public_key(public))}\"\n")


WORST_CASE_UID = "1." + "2" * 62  # a 64-character Study Instance UID: the longest a token must carry
MAX_QR_VERSION = 10  # at error correction M: what cheap phone cameras still read off thin paper


def qr_version(url: str) -> int:
    from kiosk.qr import make_qr

    return int(make_qr(url).version)


def check_film_link(config: EdgeConfig) -> DoctorItem:
    """``edge doctor``: the QR opens the cloud's host (not the example), fits version 10-M, and the key reads."""
    from urllib.parse import urlsplit

    from edge.part import DoctorItem
    from kiosk.config import EXAMPLE_FILM_HOST

    k = config.kiosk
    host = urlsplit(k.viewer_url_template).hostname or ""
    key_file = config.path(k.token_key_file)
    try:
        key = load_or_create_key(config.data_dir, key_file, create=False)
        kid = key_id(key.public_key())
    except KeyFileError as exc:
        if key_file is not None or key_path(config.data_dir).exists():
            return DoctorItem("film link", "fail", str(exc), "fix the key file, or `edge kiosk rotate-key` and register it")
        key = Ed25519PrivateKey.generate()  # none yet: the kiosk makes it at first start; size the QR with any key
        kid = "not made yet"
    url = viewer_url(k.viewer_url_template, WORST_CASE_UID, make_token(key, WORST_CASE_UID, config.node.id, k.token_days))
    version = qr_version(url)
    if version > MAX_QR_VERSION:
        return DoctorItem("film link", "fail", f"QR would be version {version}-M with a 64-character study UID",
                          f"shorten [kiosk] viewer_url_template (host and path) to keep the QR at version {MAX_QR_VERSION} or less")
    if host == EXAMPLE_FILM_HOST:
        return DoctorItem("film link", "warn", f"[kiosk] viewer_url_template points at the example host {host}: "
                          "patients' QR codes open nothing",
                          "set it to the cloud's film URL, e.g. https://film.<cloud>/film/{token}, and register "
                          "`edge kiosk public-key` with the cloud (kiosk/cloud_film/README.md)")
    return DoctorItem("film link", "pass", f"QR opens {host} (version {version}-M at most), key {kid}")
