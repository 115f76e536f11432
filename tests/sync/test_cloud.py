"""Reaching the cloud safely: credentials from the secrets file, TLS verified by default,
a private CA and mutual TLS, against a real TLS server on loopback (certificates made
by openssl in the test)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from edge.node.config import EdgeConfig, parse_config
from sync.cloud import CloudSetupError, load_auth_headers, open_session
from sync.dicomweb import DicomWebClient, DicomWebError


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Regional PACS CA",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                "-CAcreateserial", "-days", "2", "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@asynccontextmanager
async def tls_cloud(pki: dict[str, Path], require_client_cert: bool = False) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A QIDO-RS endpoint over TLS; yields its DICOMweb URL and what each request carried."""
    seen: list[dict[str, Any]] = []

    async def qido(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        seen.append({"authorization": request.headers.get("Authorization"), "client_cert": bool(peer)})
        return web.json_response([], content_type="application/dicom+json")

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server.pem"], pki["server.key"])
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki["ca.pem"])
    app = web.Application()
    app.router.add_get("/dicom-web/studies/{study}/instances", qido)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}/dicom-web", seen
    finally:
        await runner.cleanup()


def config_for(tmp_path: Path, **cloud: Any) -> EdgeConfig:
    return parse_config({"cloud": cloud, "storage": {"data_dir": str(tmp_path / "var")}}, tmp_path)


async def ask(config: EdgeConfig, url: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    async with open_session(config) as session:
        return await DicomWebClient(session, url, headers).find_instances("1.2.3")


def test_bearer_token_from_the_secrets_file_is_sent(pki: dict[str, Path], tmp_path: Path) -> None:
    secrets = tmp_path / "cloud.secrets"
    secrets.write_text('token = "clinic-0001-token"\n')
    secrets.chmod(0o600)

    async def main() -> list[dict[str, Any]]:
        async with tls_cloud(pki) as (url, seen):
            config = config_for(tmp_path, dicomweb_url=url, ca_bundle=str(pki["ca.pem"]), secrets_file=str(secrets))
            await ask(config, url, load_auth_headers(config.path(config.cloud.secrets_file)))
            return seen

    assert asyncio.run(main()) == [{"authorization": "Bearer clinic-0001-token", "client_cert": False}]


def test_untrusted_certificate_is_refused_by_default(pki: dict[str, Path], tmp_path: Path) -> None:
    async def main() -> DicomWebError:
        async with tls_cloud(pki) as (url, seen):
            with pytest.raises(DicomWebError) as caught:
                await ask(config_for(tmp_path, dicomweb_url=url), url)
            assert seen == []  # nothing reached a server we could not verify
            return caught.value

    error = asyncio.run(main())
    assert "TLS certificate not trusted" in str(error)
    assert error.transient  # the node keeps everything queued until the cloud is fixed


def test_private_ca_bundle_and_switching_verification_off_both_connect(pki: dict[str, Path], tmp_path: Path) -> None:
    async def main() -> int:
        async with tls_cloud(pki) as (url, seen):
            await ask(config_for(tmp_path, dicomweb_url=url, ca_bundle=str(pki["ca.pem"])), url)
            await ask(config_for(tmp_path, dicomweb_url=url, verify_tls=False), url)
            return len(seen)

    assert asyncio.run(main()) == 2


def test_mutual_tls_needs_the_client_certificate(pki: dict[str, Path], tmp_path: Path) -> None:
    async def main() -> list[dict[str, Any]]:
        async with tls_cloud(pki, require_client_cert=True) as (url, seen):
            with pytest.raises(DicomWebError):
                await ask(config_for(tmp_path, dicomweb_url=url, ca_bundle=str(pki["ca.pem"])), url)
            config = config_for(
                tmp_path, dicomweb_url=url, ca_bundle=str(pki["ca.pem"]),
                client_cert=str(pki["client.pem"]), client_key=str(pki["client.key"]),
            )
            await ask(config, url)
            return seen

    assert asyncio.run(main()) == [{"authorization": None, "client_cert": True}]


@pytest.mark.parametrize(
    "content,mode,message",
    [
        ('token = "x"\n', 0o640, "readable by others"),
        ('tokn = "x"\n', 0o600, "unknown key(s) tokn"),
        ('username = "clinic"\n', 0o600, "needs token, or username and password"),
        ("token = \n", 0o600, "not valid TOML"),
    ],
)
def test_bad_secrets_file_is_refused_naming_the_key(tmp_path: Path, content: str, mode: int, message: str) -> None:
    secrets = tmp_path / "cloud.secrets"
    secrets.write_text(content)
    secrets.chmod(mode)
    with pytest.raises(CloudSetupError) as caught:
        load_auth_headers(secrets)
    assert "[cloud] secrets_file" in str(caught.value)
    assert message in str(caught.value)


def test_missing_tls_file_is_a_clear_start_up_error(tmp_path: Path) -> None:
    config = config_for(tmp_path, dicomweb_url="https://127.0.0.1:1/dicom-web", ca_bundle="missing-ca.pem")
    with pytest.raises(CloudSetupError) as caught:
        open_session(config)
    assert "[cloud] TLS files" in str(caught.value)
