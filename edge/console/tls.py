"""HTTPS for the console: so a technician's password does not cross the clinic LAN in clear.

``[console] tls_cert`` / ``tls_key`` name a PEM certificate and key; set, the console
serves https only (and its cookies are Secure). ``edge provision --console-tls`` makes a
self-signed pair for the node's name and addresses with :func:`make_self_signed`; the
clinic's browsers trust it once (or ops push it as a CA). A missing, unreadable or
mismatched file stops the console at start-up with the key's name, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Sequence
from pathlib import Path

from edge.node.config import EdgeConfig
from edge.service import ServiceSetupError

CERT_DAYS = 10 * 365  # a clinic box lives for years; renewing means re-running provisioning


class ConsoleTlsError(ServiceSetupError):
    """The console's certificate or key cannot be used; the message names the key."""


def console_ssl_context(config: EdgeConfig) -> ssl.SSLContext | None:
    """The server context for ``[console] tls_cert``/``tls_key``, or None when both are "" (plain http)."""
    cfg = config.console
    if not cfg.tls_cert and not cfg.tls_key:
        return None
    if not cfg.tls_cert or not cfg.tls_key:
        missing = "tls_cert" if not cfg.tls_cert else "tls_key"
        raise ConsoleTlsError(f"[console] {missing}: must be set too when "
                              f"{'tls_key' if missing == 'tls_cert' else 'tls_cert'} is (or leave both empty)")
    cert, key = config.path(cfg.tls_cert), config.path(cfg.tls_key)
    assert cert is not None and key is not None
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            with path.open("rb") as handle:
                head = handle.read(64 * 1024)
        except FileNotFoundError:
            raise ConsoleTlsError(f"[console] {name}: {path} not found "
                                  "(make one with: edge provision --console-tls)") from None
        except OSError as exc:
            raise ConsoleTlsError(f"[console] {name}: cannot read {path}: {exc.strerror}") from None
        if b"-----BEGIN " not in head:
            raise ConsoleTlsError(f"[console] {name}: {path} is not a PEM file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConsoleTlsError(f"[console] tls_cert/tls_key: {cert} and {key} do not make a usable pair "
                              f"(not a certificate, not a key, or not each other's): {exc.reason or exc}") from None
    return context


def make_self_signed(cert_path: Path, key_path: Path, common_name: str, hosts: Sequence[str]) -> None:
    """An ECDSA P-256 key (mode 600) and a self-signed certificate for ``hosts`` (names and IP addresses).

    Written by temp file + rename, so a power cut leaves the old pair or the new one.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from edge.ops.provision import atomic_write

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h for h in hosts if h):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "clinic-edge")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # a box whose clock is a little behind
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        # CA:TRUE so a browser or curl can be given this very file as the CA to trust.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    for path in (cert_path, key_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(key_path, key_pem, 0o600, owner_of=key_path.parent)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode(), 0o644, owner_of=cert_path.parent)
