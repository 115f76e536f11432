"""``edge provision``: write a node's identity and credentials onto the node, or onto an image.

Settings go into edge.toml in place (tomlkit keeps every comment), are validated with
the node's own schema before anything is written, and land by temp file + rename, so a
power cut during provisioning leaves the old file or the new one, never half of each.
Credentials never go into edge.toml: they go to the secrets files (mode 600) that
``[cloud] secrets_file`` and ``[ops] pushgateway_secrets_file`` name.

The same settings can be dropped as ``edge-provision.toml`` on an image's boot
partition; the first-boot unit applies that file and deletes it (a FAT partition has no
file modes, so credentials must not stay there).

``--console-tls`` (a ``[console_tls]`` table in the file) makes the console's self-signed
certificate and key (mode 600) next to edge.toml for the node's names and addresses and
sets ``[console] tls_cert``/``tls_key``; on an image it is made at first boot, on the node,
so the key never leaves the box and the addresses are the box's own.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import Table

from edge.config import ConfigError
from edge.files import write_durably
from edge.node.config import EdgeConfig, parse_config

PROVISION_FILE_NAME = "edge-provision.toml"
# Provisioning table → (section, key naming the secrets file, default file name next to edge.toml).
SECRET_TABLES: dict[str, tuple[str, str, str]] = {
    "secrets": ("cloud", "secrets_file", "cloud-secrets.toml"),
    "pushgateway_secrets": ("ops", "pushgateway_secrets_file", "pushgateway-secrets.toml"),
}
_SECRET_KEYS = {"token", "username", "password"}
# The console's certificate and key, next to edge.toml unless [console] tls_cert/tls_key say otherwise.
CONSOLE_TLS_FILES = {"tls_cert": "console-tls.crt", "tls_key": "console-tls.key"}


class ProvisionError(Exception):
    """The provisioning input cannot be applied; the message says which key and why."""


@dataclass
class Provisioning:
    """What to write: edge.toml settings by section, credentials by secrets table, the disk key."""

    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    disk_key: bytes | None = None
    console_tls_hosts: list[str] | None = None  # None: no certificate; a list: make one, with these extra names

    def set(self, section: str, key: str, value: Any) -> None:
        if value is not None:
            self.settings.setdefault(section, {})[key] = value

    def to_toml(self) -> str:
        doc = tomlkit.document()
        doc.add(tomlkit.comment("Clinic Edge first-boot provisioning: applied once, then deleted. Holds credentials."))
        for section, values in {**self.settings, **self.secrets}.items():
            doc[section] = values
        if self.disk_key is not None:
            doc["disk"] = {"luks_key": base64.b64encode(self.disk_key).decode()}
        if self.console_tls_hosts is not None:
            doc["console_tls"] = {"hosts": self.console_tls_hosts}
        return tomlkit.dumps(doc)


def read_provision_file(path: Path) -> Provisioning:
    try:
        data = tomlkit.parse(path.read_text("utf-8")).unwrap()
    except FileNotFoundError:
        raise ProvisionError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, tomlkit.exceptions.ParseError) as exc:
        raise ProvisionError(f"{path}: cannot read: {exc}") from None
    prov = Provisioning()
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ProvisionError(f"{path}: {name}: expected a [table]")
        if name in SECRET_TABLES:
            unknown = set(table) - _SECRET_KEYS
            if unknown:
                raise ProvisionError(f"{path}: [{name}] unknown key(s) {', '.join(sorted(unknown))}")
            prov.secrets[name] = {k: str(v) for k, v in table.items()}
        elif name == "console_tls":
            hosts = table.get("hosts", [])
            if set(table) - {"hosts"} or not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise ProvisionError(f"{path}: [console_tls] takes only hosts = [\"name or address\", …]")
            prov.console_tls_hosts = list(hosts)
        elif name == "disk":
            if set(table) - {"luks_key"}:
                raise ProvisionError(f"{path}: [disk] takes only luks_key = \"<base64>\"")
            try:
                prov.disk_key = base64.b64decode(str(table["luks_key"]), validate=True)
            except (KeyError, ValueError):
                raise ProvisionError(f"{path}: [disk] luks_key must be base64") from None
            if len(prov.disk_key) < 32:
                raise ProvisionError(f"{path}: [disk] luks_key must be at least 32 random bytes")
        else:
            prov.settings[name] = dict(table)
    return prov


def masked(text: str) -> str:
    """A provisioning file as an engineer may see it on screen: every credential and the disk key shown as ``****``."""
    try:
        doc = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        return f"(not valid TOML: {exc})"
    for name in (*SECRET_TABLES, "disk"):
        table = doc.get(name)
        if isinstance(table, Table):
            for key in list(table.keys()):
                table[key] = "****"
    return tomlkit.dumps(doc)


def atomic_write(path: Path, text: str, mode: int, owner_of: Path | None = None) -> None:
    """``text`` written durably (edge.files) with ``mode``; as root, owned like ``owner_of`` (the node's user)."""
    owner = None
    if owner_of is not None and os.geteuid() == 0:
        st = owner_of.stat()
        owner = (st.st_uid, st.st_gid)  # the node's user must read its own secrets
    write_durably(path, text.encode("utf-8"), mode=mode, owner=owner)


@dataclass
class _Merged:
    """edge.toml with the provisioning merged in, in memory: what apply would write."""

    doc: tomlkit.TOMLDocument
    changed: list[str]
    secret_files: list[tuple[Path, str]]
    tls_files: tuple[Path, Path] | None


def _read_config_doc(config_path: Path) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(config_path.read_text("utf-8")) if config_path.exists() else tomlkit.document()
    except (OSError, UnicodeDecodeError, tomlkit.exceptions.ParseError) as exc:
        raise ProvisionError(f"{config_path}: cannot read: {exc}") from None


def _merge(config_path: Path, prov: Provisioning) -> _Merged:
    doc = _read_config_doc(config_path)
    changed: list[str] = []
    for section, values in prov.settings.items():
        table = doc.get(section)
        if table is None:
            table = tomlkit.table()
            doc[section] = table
        if not isinstance(table, Table):
            raise ProvisionError(f"{config_path}: [{section}] is not a table")
        for key, value in values.items():
            if table.get(key) != value:
                table[key] = value
                changed.append(f"[{section}] {key}")
    secret_files: list[tuple[Path, str]] = []
    for name, creds in prov.secrets.items():
        section, key, default = SECRET_TABLES[name]
        table = doc.setdefault(section, tomlkit.table())
        if not table.get(key):
            table[key] = default
            changed.append(f"[{section}] {key}")
        target = Path(str(table[key]))
        target = target if target.is_absolute() else config_path.parent / target
        secret_files.append((target, tomlkit.dumps(creds)))
    tls_files: tuple[Path, Path] | None = None
    if prov.console_tls_hosts is not None:
        tls_files = _console_tls_keys(doc, config_path, changed)
    return _Merged(doc, changed, secret_files, tls_files)


def check(config_path: Path, prov: Provisioning, source: str) -> EdgeConfig:
    """The node's config as it would be after provisioning, validated by its own schema; writes nothing.

    First boot runs this before it touches the disk, so a bad key stops the box with the key
    named (``source: [dicom] port: …``) instead of half-provisioning it. A bad base config is
    named as itself, so the provisioning file is not blamed for it.
    """
    base_dir = config_path.resolve().parent
    try:
        parse_config(_read_config_doc(config_path).unwrap(), base_dir, str(config_path))
    except ConfigError as exc:
        raise ProvisionError(f"the node's own config is bad: {exc}") from None
    merged = _merge(config_path, prov)
    try:
        return parse_config(merged.doc.unwrap(), base_dir, source)
    except ConfigError as exc:
        raise ProvisionError(str(exc)) from None


def apply(config_path: Path, prov: Provisioning) -> list[str]:
    """Update edge.toml and the secrets files; returns what changed ("[node] id", "secrets file …")."""
    merged = _merge(config_path, prov)
    doc, changed, secret_files, tls_files = merged.doc, merged.changed, merged.secret_files, merged.tls_files
    try:
        config = parse_config(doc.unwrap(), config_path.resolve().parent, str(config_path))
    except ConfigError as exc:
        raise ProvisionError(f"not applied: {exc}") from None
    for target, text in secret_files:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, text, 0o600, owner_of=config_path.parent)
        changed.append(f"secrets file {target}")
    if tls_files is not None and not all(p.exists() for p in tls_files):
        from edge.console.tls import make_self_signed

        node = doc.get("node") or {}
        node_id = str(node.get("id", "clinic-0001"))
        hosts = node_hosts(node_id, prov.console_tls_hosts or [])
        make_self_signed(tls_files[0], tls_files[1], str(node.get("name", node_id)), hosts)
        changed.append(f"secrets file {tls_files[1]} and certificate {tls_files[0]} for {', '.join(hosts)}")
    changed += film_signing_key(config, config_path.parent)
    if any(not c.startswith("secrets file") for c in changed):
        mode = config_path.stat().st_mode & 0o777 if config_path.exists() else 0o640
        atomic_write(config_path, tomlkit.dumps(doc), mode)
    return changed


def film_signing_key(config: EdgeConfig, owner_of: Path) -> list[str]:
    """The node's cloud-film key pair, made here on the node; ``edge kiosk public-key`` prints the public half."""
    from kiosk.viewer_token import key_id, key_path, load_or_create_key

    key_file = config.path(config.kiosk.token_key_file)
    path = key_path(config.data_dir, key_file)
    if path.exists():
        return []
    made = [p for p in (path, *path.parents) if not p.exists()]
    key = load_or_create_key(config.data_dir, key_file, create=True)
    if os.geteuid() == 0:  # the node's user must read its own key (and write the folders made for it)
        st = owner_of.stat()
        for p in made:
            os.chown(p, st.st_uid, st.st_gid)
    return [f"secrets file {path} (film signing key {key_id(key.public_key())}; `edge kiosk public-key` prints it)"]


def _console_tls_keys(doc: tomlkit.TOMLDocument, config_path: Path, changed: list[str]) -> tuple[Path, Path]:
    """Point [console] tls_cert/tls_key at the certificate files (defaults next to edge.toml); their paths."""
    table = doc.get("console")
    if table is None:
        table = tomlkit.table()
        doc["console"] = table
    if not isinstance(table, Table):
        raise ProvisionError(f"{config_path}: [console] is not a table")
    paths = []
    for key, default in CONSOLE_TLS_FILES.items():
        if not table.get(key):
            table[key] = default
            changed.append(f"[console] {key}")
        path = Path(str(table[key]))
        paths.append(path if path.is_absolute() else config_path.parent / path)
    return paths[0], paths[1]


def node_hosts(node_id: str, extra: list[str]) -> list[str]:
    """What the clinic's PCs may type to reach this node: its names, its mDNS name, its addresses."""
    import ifaddr

    hostname = socket.gethostname()
    hosts = [*extra, hostname, f"{hostname}.local", f"{node_id}.local", "localhost"]
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip if ip.is_IPv4 else ip.ip[0]
            if isinstance(address, str) and not ipaddress.ip_address(address.split("%")[0]).is_link_local:
                hosts.append(address.split("%")[0])
    return list(dict.fromkeys(h for h in hosts if h))


def write_boot_file(boot_dir: Path, text: str) -> Path:
    """``edge-provision.toml`` (``Provisioning.to_toml()``) on a mounted boot partition, for the first-boot unit."""
    if not boot_dir.is_dir():
        raise ProvisionError(f"{boot_dir}: not a folder (mount the image's boot partition first)")
    target = boot_dir / PROVISION_FILE_NAME
    try:
        atomic_write(target, text, 0o600)
    except PermissionError:  # a mounted FAT refuses chmod unless the mode is what its mount options give
        write_durably(target, text.encode("utf-8"))
    return target


def write_disk_key(path: Path, key: bytes) -> None:
    """The LUKS key for first boot (on /run, a tmpfs): base64, mode 600, never on the boot partition."""
    atomic_write(path, base64.b64encode(key).decode() + "\n", 0o600)
