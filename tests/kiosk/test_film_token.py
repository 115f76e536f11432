"""The film link's token, key pair and QR, as the cloud and a phone camera would meet them (issue 14 item 6)."""

from __future__ import annotations

import datetime as dt
import stat
import time
import tomllib
from pathlib import Path

import pytest
import segno
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas

from edge.node.config import load_config
from edge.ops.provision import Provisioning, apply
from kiosk.cloud_film.film_token import (
    RegisteredKey,
    TokenError,
    b64,
    read_claims,
    read_keys_file,
)
from kiosk.cloud_film.film_token import verify_token as cloud_verify
from kiosk.i18n import load_catalog
from kiosk.qr import draw_qr, make_qr
from kiosk.receipt import render_receipt
from kiosk.report_pdf import ReportPage, render_report_pdf
from kiosk.viewer_token import (
    KeyFileError,
    check_film_link,
    key_id,
    load_or_create_key,
    make_token,
    public_key_entry,
    viewer_url,
)
from sync.reports import ReportView
from tests.conftest import edge_cli, write_config
from tests.kiosk.helpers import escpos_qr_payloads, qr_urls_in_pdf

# The longest a Study Instance UID may be (64), and a realistic cloud host: the worst QR a clinic prints.
LONG_UID = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"
TEMPLATE = "https://film.cloud-pacs.example.org/film/{token}"
NODE = "clinic-0001"


def keys_of(*keys: Ed25519PrivateKey, node: str = NODE) -> dict[tuple[str, str], RegisteredKey]:
    return {(node, key_id(k.public_key())): RegisteredKey(node, key_id(k.public_key()), k.public_key()) for k in keys}


def test_key_pair_is_made_once_at_first_use_mode_600_and_refused_when_others_can_read_it(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "var")
    key_file = tmp_path / "var/kiosk/film-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in key_file.read_bytes()
    assert key_id(load_or_create_key(tmp_path / "var").public_key()) == key_id(key.public_key())  # reused
    with pytest.raises(KeyFileError, match="cannot read"):  # a configured key that went missing: no silent new key
        load_or_create_key(tmp_path / "var", tmp_path / "provisioned.pem")
    key_file.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        load_or_create_key(tmp_path / "var")


def test_token_names_node_key_study_and_expiry_and_only_the_nodes_public_key_verifies_it() -> None:
    key, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    token = make_token(key, LONG_UID, NODE, days=30)
    assert len(token) <= 170 and set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    claims = cloud_verify(token, keys_of(key), LONG_UID)
    assert (claims.node_id, claims.key_id, claims.study_uid) == (NODE, key_id(key.public_key()), LONG_UID)
    assert claims.expires_at - claims.issued_at == 30 * 86400

    def reason(token: str, keys: dict[tuple[str, str], RegisteredKey], study: str | None = None) -> str:
        with pytest.raises(TokenError) as caught:
            cloud_verify(token, keys, study)
        return caught.value.reason

    raw = read_claims(token)[1]
    assert reason(token, keys_of(stranger)) == "unknown_key"  # another node's key id
    assert reason(token, keys_of(key, node="clinic-0002")) == "unknown_key"  # same key, other node
    for flip in (1, 9, len(raw) - 1, len(raw) + 5):  # key id, expiry, study, signature
        tampered = bytearray(read_claims(token)[1] + read_claims(token)[2])
        tampered[flip] ^= 0x01
        assert reason(b64(bytes(tampered)), keys_of(key)) == ("unknown_key" if flip == 1 else "bad_signature")
    assert reason(token, keys_of(key), "1.2.3") == "other_study"
    assert reason(make_token(key, LONG_UID, NODE, days=1, now=time.time() - 2 * 86400), keys_of(key)) == "expired"
    assert reason("not a token", keys_of(key)) == "malformed"
    assert reason(token[:40], keys_of(key)) == "malformed"
    with pytest.raises(ValueError, match="not a DICOM UID"):
        make_token(key, "1.2.3<script>", NODE, 30)


def test_qr_on_the_printed_a4_page_decodes_with_zbarimg_and_is_at_most_version_10_m(tmp_path: Path) -> None:
    url = viewer_url(TEMPLATE, LONG_UID, make_token(Ed25519PrivateKey.generate(), LONG_UID, NODE, 30))
    assert int(make_qr(url).version) <= 10 and make_qr(url).error == "M"
    report = ReportView(LONG_UID, "1.2.3.4", "sr", "Finding: Normal chest.", None, tmp_path / "r.dcm",
                        "COMPLETE", "VERIFIED", "20261124101500", dt.datetime(2026, 11, 24))
    page = ReportPage("Ikhaya Clinic", "Zanele Mthembu", "Chest X-ray", "20261123", report, url,
                      dt.date(2026, 12, 24), dt.datetime(2026, 11, 24, 9, 0))
    pdf = tmp_path / "a4.pdf"
    pdf.write_bytes(render_report_pdf(page, load_catalog("zu")))
    assert qr_urls_in_pdf(pdf, tmp_path) == [url]  # pdftoppm at 150 dpi, then zbarimg
    assert LONG_UID not in url and "Zanele" not in url  # no patient data, not even the study UID, in the URL


def test_qr_on_the_80mm_receipt_decodes_with_zbarimg_from_a_150_dpi_rendering(tmp_path: Path) -> None:
    """The receipt printer draws its own QR (GS ( k, module 6 dots at 203 dpi): we draw the same on 80 mm paper."""
    url = viewer_url(TEMPLATE, LONG_UID, make_token(Ed25519PrivateKey.generate(), LONG_UID, NODE, 30))
    report = ReportView(LONG_UID, "1.2.3.4", "sr", "Finding: Normal chest.", None, tmp_path / "r.dcm",
                        "COMPLETE", "VERIFIED", "20261124101500", dt.datetime(2026, 11, 24))
    page = ReportPage("Ikhaya Clinic", "Zanele Mthembu", "Chest X-ray", "20261123", report, url,
                      dt.date(2026, 12, 24), dt.datetime(2026, 11, 24, 9, 0))
    data = render_receipt(page, load_catalog("en"))
    assert escpos_qr_payloads(data) == [url] and b"\x1d(k\x03\x001E1" in data  # level M
    qr = segno.make_qr(url, error="m", boost_error=False)
    assert int(qr.version) <= 10
    module = 6 / 203 * 72  # points: the printer's module size
    size = (len(list(qr.matrix)) + 8) * module
    pdf = tmp_path / "receipt.pdf"
    c = Canvas(str(pdf), pagesize=(80 * mm, size + 20 * mm))
    draw_qr(c, qr, (80 * mm - size) / 2, 10 * mm, size)
    c.showPage()
    c.save()
    assert size < 72 * mm  # fits the printable width
    assert qr_urls_in_pdf(pdf, tmp_path) == [url]


def test_edge_kiosk_public_key_prints_the_entry_that_verifies_what_the_kiosk_mints(tmp_path: Path) -> None:
    config_path = write_config(tmp_path / "edge.toml", tmp_path / "var", node={"id": "clinic-0042", "name": "Ikhaya"},
                               kiosk={"viewer_url_template": TEMPLATE})
    done = edge_cli(config_path, "kiosk", "public-key")
    keys_file = tmp_path / "cloud-film-keys.toml"
    keys_file.write_text(done.stdout)
    assert "PRIVATE" not in done.stdout and tomllib.loads(done.stdout)["key"][0]["node"] == "clinic-0042"

    from kiosk.app import (
        make_context,  # the kiosk's own start-up: its key, its link maker
    )

    link = make_context(load_config(config_path)).link
    url, expires = link.url(LONG_UID)
    token = url.rsplit("/", 1)[-1]
    claims = cloud_verify(token, read_keys_file(keys_file), LONG_UID)
    assert claims.node_id == "clinic-0042" and expires > dt.date.today() + dt.timedelta(days=29)

    # Rotation: new tokens use the new key; the old public key still verifies the old tokens.
    rotated = edge_cli(config_path, "kiosk", "rotate-key")
    with keys_file.open("a") as handle:
        handle.write(rotated.stdout.split("\n", 1)[1])  # the cloud appends the new entry beside the old
    new_token = make_context(load_config(config_path)).link.url(LONG_UID)[0].rsplit("/", 1)[-1]
    registered = read_keys_file(keys_file)
    assert len(registered) == 2 and read_claims(new_token)[0].key_id != claims.key_id
    assert cloud_verify(new_token, registered).key_id in rotated.stdout
    assert cloud_verify(token, registered).key_id == claims.key_id
    only_old = {k: v for k, v in registered.items() if k[1] == claims.key_id}
    with pytest.raises(TokenError, match="no public key"):
        cloud_verify(new_token, only_old)
    assert list((tmp_path / "var/kiosk").glob("film-key.pem.*.retired"))


def test_a_key_id_that_does_not_match_its_public_key_is_refused_by_the_cloud(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    entry = public_key_entry(key, NODE).replace(key_id(key.public_key()), "00000000")
    (tmp_path / "keys.toml").write_text(entry)
    with pytest.raises(ValueError, match="does not match"):
        read_keys_file(tmp_path / "keys.toml")


def test_provisioning_makes_the_key_pair_on_the_node(tmp_path: Path) -> None:
    config_path = write_config(tmp_path / "edge.toml", tmp_path / "var")
    changed = apply(config_path, Provisioning(settings={"node": {"id": "clinic-0077"}}))
    key_file = tmp_path / "var/kiosk/film-key.pem"
    assert any("film signing key" in c for c in changed) and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    kid = key_id(load_or_create_key(tmp_path / "var").public_key())
    assert apply(config_path, Provisioning(settings={"node": {"name": "Ikhaya"}})) == ["[node] name"]  # kept
    assert kid in edge_cli(config_path, "kiosk", "public-key").stdout


def test_doctor_warns_while_the_link_points_at_the_example_host(tmp_path: Path) -> None:
    config_path = write_config(tmp_path / "edge.toml", tmp_path / "var")
    item = check_film_link(load_config(config_path))
    assert item.verdict == "warn" and "film.example" in item.detail
    write_config(config_path, tmp_path / "var", kiosk={"viewer_url_template": TEMPLATE})
    load_or_create_key(tmp_path / "var")
    item = check_film_link(load_config(config_path))
    assert item.verdict == "pass" and "film.cloud-pacs.example.org" in item.detail
    long = "https://film." + "very-long-cloud-name." * 4 + "example.org/patients/film-viewer/{token}"
    write_config(config_path, tmp_path / "var", kiosk={"viewer_url_template": long})
    item = check_film_link(load_config(config_path))
    assert item.verdict == "fail" and "version" in item.detail
    doctor = edge_cli(config_path, "doctor", check=False)
    assert "FAIL  film link   QR would be version" in doctor.stdout, doctor.stderr


def test_the_worked_example_in_token_md_reproduces_byte_for_byte() -> None:
    doc = (Path(__file__).resolve().parents[2] / "kiosk/TOKEN.md").read_text()
    documented = doc.split("\ntoken       ", 1)[1].split()[0]
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    uid = "1.2.840.113619.2.55.3.604688119.971.1795435200.1"
    assert make_token(key, uid, NODE, 30, now=1795435200) == documented
    assert f"key id {key_id(key.public_key())}" in doc
    claims = cloud_verify(documented, keys_of(key), uid, now=1795435200 + 86400)
    assert (claims.issued_at, claims.expires_at) == (1795435200, 1795435200 + 30 * 86400)
