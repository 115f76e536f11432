"""Cloud film on a phone: the QR's URL opened against a real Orthanc running kiosk/cloud_film (issue 14 item 5).

Orthanc 1.10 with DICOMweb and orthanc-python loading ``film_plugin.py`` straight from the
repository; a DX and the reader's signed SR (and a PDF) stored in it as a reporting system
would; tokens minted with the node's own key; the page opened in headless Chromium with a
phone's viewport.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from kiosk.cloud_film.film_page import REFUSED_TEXT
from kiosk.cloud_film.film_token import b64, read_claims
from kiosk.viewer_token import make_token, public_key_entry, viewer_url
from tests.dicom_factory import make_dx
from tests.peers.orthanc import DICOMWEB_PLUGIN, OrthancPeer
from tests.sync.test_dicomweb import make_pdf_report, make_text_sr

REPO = Path(__file__).resolve().parents[2]
PYTHON_PLUGIN = Path("/usr/lib/orthanc/libOrthancPython.so.4.0")
PLUGIN_SCRIPT = REPO / "kiosk/cloud_film/film_plugin.py"
USER, PASSWORD = "cloud-admin", "s3cret-admin"
NODE = "clinic-0001"
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True,
         "user_agent": "Mozilla/5.0 (Linux; Android 8.1.0; Nokia 2) AppleWebKit/537.36 (KHTML, like Gecko) "
                       "Chrome/70.0.3538.110 Mobile Safari/537.36"}

pytestmark = pytest.mark.skipif(not PYTHON_PLUGIN.exists(), reason="orthanc-python is not installed (scripts/test.sh)")


class FilmCloud(OrthancPeer):
    """The regional cloud: Orthanc whose own REST needs a registered user (the plugin's filter asks for it)."""

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                 timeout: float = 10.0) -> Any:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """An anonymous GET, as the phone (or a stranger holding a token) makes it."""
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=20) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def signed_sr(path: Path, image: Dataset, text: str, when: str = "20261124120000") -> Dataset:
    """The reader's verified report, as the reporting system signs it."""
    sr = make_text_sr(path, image, text=text)
    observer = Dataset()
    observer.VerifyingObserverName = "Dlamini^Thandi^^Dr"
    observer.VerifyingOrganization = "Regional Imaging"
    observer.VerificationDateTime = when
    observer.VerifyingObserverIdentificationCodeSequence = DicomSequence([])
    sr.VerifyingObserverSequence = DicomSequence([observer])
    sr.VerificationFlag, sr.CompletionFlag = "VERIFIED", "COMPLETE"
    sr.ContentDate, sr.ContentTime = when[:8], when[8:]
    sr.save_as(path, enforce_file_format=True)
    return sr


@pytest.fixture
def node_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def cloud(tmp_path: Path, node_key: Ed25519PrivateKey) -> Iterator[FilmCloud]:
    keys = tmp_path / "cloud-film-keys.toml"
    keys.write_text(public_key_entry(node_key, NODE, "Ikhaya Clinic"))  # what `edge kiosk public-key` printed
    peer = FilmCloud(tmp_path / "orthanc", extra_config={
        "Plugins": [str(DICOMWEB_PLUGIN), str(PYTHON_PLUGIN)],
        "PythonScript": str(PLUGIN_SCRIPT),
        "AuthenticationEnabled": False,  # the plugin's filter guards every other route with RegisteredUsers
        "RegisteredUsers": {USER: PASSWORD},
        "OrthancExplorerEnabled": True,
        "CloudFilm": {"KeysFile": str(keys), "AccessLog": str(tmp_path / "film-access.jsonl")},
    })
    peer.start()
    yield peer
    peer.kill()


@pytest.fixture
def study(cloud: FilmCloud, tmp_path: Path) -> Dataset:
    """A chest X-ray and its signed report, in the cloud."""
    image = make_dx(tmp_path / "dx.dcm", rows=600, cols=480, accession="ACC-F1")
    image.StudyDescription = "Chest X-ray"
    image.PatientName = "Mthembu^Zanele"
    image.save_as(tmp_path / "dx.dcm", enforce_file_format=True)
    cloud.upload(tmp_path / "dx.dcm")
    signed_sr(tmp_path / "sr.dcm", image, "No acute cardiopulmonary findings. Heart size normal.")
    cloud.upload(tmp_path / "sr.dcm")
    return image


def film_url(cloud: FilmCloud, token: str) -> str:
    return viewer_url(cloud.base_url + "/film/{token}", "", token)


def access_log(tmp_path: Path) -> list[dict[str, str]]:
    path = tmp_path / "film-access.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_phone_opens_the_qr_and_sees_the_image_and_the_verified_report(
    cloud: FilmCloud, study: Dataset, node_key: Ed25519PrivateKey, browser: Any, tmp_path: Path,
) -> None:
    url = film_url(cloud, make_token(node_key, study.StudyInstanceUID, NODE, 30))
    context = browser.new_context(**PHONE)
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    response = page.goto(url)
    assert response is not None and response.status == 200
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.naturalWidth, e.naturalHeight, e.clientWidth])")
    assert len(sizes) == 1 and sizes[0][0] > 0 and sizes[0][1] > 0, sizes
    assert 300 <= sizes[0][2] <= 390  # fills the phone's width, no sideways scrolling
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    text = page.inner_text("body")
    assert "No acute cardiopulmonary findings. Heart size normal." in text
    assert "Final report, verified by Dr Thandi Dlamini on 2026-11-24 12:00" in text
    assert "Chest X-ray" in text and "Zanele Mthembu" in text
    assert page.evaluate("document.scripts.length") == 0  # no JavaScript at all
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)

    # Zoom: the image is a link to the full-size rendering, which loads on its own.
    full = page.get_attribute("a:has(img)", "href")
    assert full is not None and full.endswith("/image/0?size=full")
    with page.expect_navigation():
        page.click("img")
    width = page.evaluate("document.images[0].naturalWidth")
    assert width >= sizes[0][0]
    context.close()

    # No patient data in any URL the phone used; every one is the plugin's own, on this host.
    assert requested and all(u.startswith(cloud.base_url + "/film/") for u in requested), requested
    for secret in ("Zanele", "Mthembu", "ACC-F1", study.StudyInstanceUID, study.PatientID):
        assert not any(secret in u for u in requested), secret
    opened = access_log(tmp_path)
    assert [(e["what"], e["outcome"]) for e in opened][:2] == [("page", "shown"), ("image", "shown")]
    assert all(e["node"] == NODE and e["study"] == study.StudyInstanceUID for e in opened)
    assert "Zanele" not in json.dumps(opened)
    assert f"cloud-film: page node={NODE} study={study.StudyInstanceUID} outcome=shown" in cloud.log_tail(400)


def test_pdf_report_opens_through_its_token_checked_route(
    cloud: FilmCloud, node_key: Ed25519PrivateKey, browser: Any, tmp_path: Path,
) -> None:
    image = make_dx(tmp_path / "dx.dcm", accession="ACC-F2")
    cloud.upload(tmp_path / "dx.dcm")
    make_pdf_report(tmp_path / "pdf.dcm", image)
    cloud.upload(tmp_path / "pdf.dcm")
    token = make_token(node_key, image.StudyInstanceUID, NODE, 30)
    page = browser.new_context(**PHONE).new_page()
    page.goto(film_url(cloud, token))
    assert "Open the report (PDF)" in page.inner_text("body")
    href = page.get_attribute("a.pdf", "href")
    assert href == f"{token}/report.pdf"
    status, body = fetch(film_url(cloud, token) + "/report.pdf")
    assert status == 200 and body.startswith(b"%PDF-") and body.rstrip(b"\0").endswith(b"%%EOF")
    page.context.close()


def refused(status: int, body: bytes) -> bool:
    """The one plain page: 403, the sentence, and nothing about any study."""
    text = body.decode("utf-8", "replace")
    return status == 403 and REFUSED_TEXT in text and "<img" not in text and "Report" not in text


def test_tampered_expired_other_node_and_other_study_tokens_get_403_and_the_plain_page(
    cloud: FilmCloud, study: Dataset, node_key: Ed25519PrivateKey, tmp_path: Path, browser: Any,
) -> None:
    uid = study.StudyInstanceUID
    good = make_token(node_key, uid, NODE, 30)
    assert fetch(film_url(cloud, good))[0] == 200

    _, body, signature = read_claims(good)
    flipped = bytearray(body + signature)
    flipped[-10] ^= 0x40
    other_uid = "1.2.826.0.1.3680043.8.498.99"
    tokens = {
        "tampered": b64(bytes(flipped)),
        "expired": make_token(node_key, uid, NODE, 1, now=time.time() - 3 * 86400),
        "other node's key": make_token(Ed25519PrivateKey.generate(), uid, NODE, 30),
        "unregistered node": make_token(node_key, uid, "clinic-0002", 30),
        "other study (not in this cloud)": make_token(node_key, other_uid, NODE, 30),
        # the study reference swapped inside a real token: the signature no longer matches
        "other study (swapped)": b64(body.replace(body[-4:], b"\x99\x99\x99\x9f") + signature),
        "garbage": "A" * 40,
    }
    for name, token in tokens.items():
        for suffix in ("", "/image/0", "/image/0?size=full", "/report.pdf"):
            assert refused(*fetch(film_url(cloud, token) + suffix)), (name, suffix)
    # A good token cannot reach beyond its own study's images.
    assert refused(*fetch(film_url(cloud, good) + "/image/7"))

    page = browser.new_context(**PHONE).new_page()
    response = page.goto(film_url(cloud, tokens["expired"]))
    assert response is not None and response.status == 403
    assert page.inner_text("body").strip() == REFUSED_TEXT and page.query_selector("img") is None
    page.screenshot(path=str(tmp_path / "refused.png"))
    page.context.close()

    outcomes = {e["outcome"] for e in access_log(tmp_path)}
    assert {"bad_signature", "expired", "unknown_key", "no_such_study", "malformed"} <= outcomes


def test_no_other_orthanc_route_opens_with_a_token(cloud: FilmCloud, study: Dataset, node_key: Ed25519PrivateKey) -> None:
    token = make_token(node_key, study.StudyInstanceUID, NODE, 30)
    base = cloud.base_url
    routes = ["/studies", "/dicom-web/studies", "/app/explorer.html", "/system", "/patients",
              f"/dicom-web/studies/{study.StudyInstanceUID}/series", "/instances", "/film/../studies",
              "/tools/find"]
    for route in routes:
        for url, headers in ((base + route, {}), (f"{base}{route}?token={token}", {}),
                             (base + route, {"Authorization": f"Bearer {token}"}),
                             (base + route, {"Authorization": "Basic " + base64.b64encode(f"{NODE}:{token}".encode()).decode()})):
            status, body = fetch(url, headers)
            assert status in (401, 403, 404) and b"MainDicomTags" not in body and b"Mthembu" not in body, (url, status)
    # The registered user still has the whole REST API and DICOMweb (the node's uploads keep working).
    assert cloud.get("/statistics")["CountInstances"] == 2
    auth = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    assert fetch(base + "/dicom-web/studies", auth)[0] == 200


def test_only_the_newest_verified_report_shows_never_a_preliminary_and_a_hostile_tree_stays_small(
    cloud: FilmCloud, study: Dataset, node_key: Ed25519PrivateKey, tmp_path: Path,
) -> None:
    first = signed_sr(tmp_path / "first.dcm", study, "Provisional reading: see amendment.", when="20261124130000")
    cloud.upload(tmp_path / "first.dcm")
    amended = signed_sr(tmp_path / "amended.dcm", study, "AMENDED: small left pleural effusion.", when="20261124123000")
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = first.SOPClassUID, first.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedSOPSequence = first.SeriesInstanceUID, DicomSequence([ref])
    item = Dataset()
    item.StudyInstanceUID, item.ReferencedSeriesSequence = first.StudyInstanceUID, DicomSequence([series])
    amended.PredecessorDocumentsSequence = DicomSequence([item])  # names the one it replaces, whatever the clocks say
    amended.save_as(tmp_path / "amended.dcm", enforce_file_format=True)
    cloud.upload(tmp_path / "amended.dcm")
    draft = make_text_sr(tmp_path / "draft.dcm", study, text="DRAFT: do not show")  # UNVERIFIED, newest of all
    draft.ContentDate, draft.ContentTime = "20261125", "090000"
    draft.save_as(tmp_path / "draft.dcm", enforce_file_format=True)
    cloud.upload(tmp_path / "draft.dcm")

    url = film_url(cloud, make_token(node_key, study.StudyInstanceUID, NODE, 30))
    status, body = fetch(url)
    page = body.decode()
    assert status == 200 and "AMENDED: small left pleural effusion." in page
    assert "DRAFT" not in page and "Provisional reading" not in page and "No acute" not in page

    # A reader's system gone wrong: a report tree 3000 items wide and 40 deep, verified and newest.
    wide = make_text_sr(tmp_path / "wide.dcm", study, text="Wide report start")
    node = wide.ContentSequence[0]
    for depth in range(40):
        child = Dataset()
        child.RelationshipType, child.ValueType, child.TextValue = "CONTAINS", "TEXT", f"level {depth} <b>x</b>"
        node.ContentSequence = DicomSequence([child])
        node = child
    for n in range(3000):
        extra = Dataset()
        extra.RelationshipType, extra.ValueType, extra.TextValue = "CONTAINS", "TEXT", f"line {n}"
        wide.ContentSequence.append(extra)
    signed = signed_sr(tmp_path / "wide-signed.dcm", study, "unused", when="20261126080000")
    signed.ContentSequence = wide.ContentSequence
    signed.save_as(tmp_path / "wide-signed.dcm", enforce_file_format=True)
    cloud.upload(tmp_path / "wide-signed.dcm")
    status, body = fetch(url)
    page = body.decode()
    assert status == 200 and "Wide report start" in page and "longer than this page shows" in page
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page  # escaped, never markup
    assert "level 39" not in page and len(body) < 400_000
