"""Orthanc plugin (orthanc-python): ``GET /film/<token>`` opens one study on a patient's phone.

Loaded by Orthanc's ``"PythonScript"`` option (README.md here). It registers its own
token-checked routes and an incoming-HTTP filter that lets only those routes through
without credentials; every other route (REST, DICOMweb, Explorer) needs one of
Orthanc's ``RegisteredUsers``, so a token opens nothing but its own study. Orthanc's
built-in ``AuthenticationEnabled`` must be false: in Orthanc 1.10 it runs before any
plugin and would ask the patient's phone for a password; the filter takes its place.

Outside Orthanc this module imports (for tests and type checks) and registers nothing.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

try:
    import orthanc  # type: ignore[import-not-found]  # only inside Orthanc
except ImportError:
    orthanc = None

if __package__:  # imported as kiosk.cloud_film.film_plugin (tests, mypy)
    from kiosk.cloud_film import film_page, film_token
else:  # Orthanc puts the script's folder on sys.path and imports it as a top-level module
    import film_page  # type: ignore[import-not-found,no-redef]
    import film_token  # type: ignore[import-not-found,no-redef]

ROUTE = "film"
# The token is base64url; what follows it is one of the plugin's own sub-resources.
FILM_URI = re.compile(r"^/" + ROUTE + r"/([A-Za-z0-9_-]{20,400})(/image/([0-9]{1,4})|/report\.pdf)?$")
FILM_SPACE = re.compile(r"^/" + ROUTE + r"/[A-Za-z0-9_./-]*$")
MAX_IMAGES = 60
PHONE_WIDTH = 780  # px: a 390-pt phone screen at 2x
FULL_WIDTH = 2400  # px: enough to zoom into a chest X-ray on a phone without sending the 40 MB original


class Settings:
    """``"CloudFilm"`` in Orthanc's configuration, plus the users its own filter accepts."""

    def __init__(self, config: dict[str, Any]) -> None:
        section = config.get("CloudFilm", {})
        self.keys_file = Path(section.get("KeysFile", "/etc/orthanc/cloud-film-keys.toml"))
        self.access_log = Path(section["AccessLog"]) if section.get("AccessLog") else None
        self.require_auth = bool(section.get("RequireAuthentication", True))
        users = config.get("RegisteredUsers", {}) or {}
        self.credentials = [base64.b64encode(f"{u}:{p}".encode()).decode("ascii") for u, p in users.items()]
        self.orthanc_auth = bool(config.get("AuthenticationEnabled", False))


class KeyStore:
    """The registered node public keys, re-read when the file changes (a new node or key needs no restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[tuple[str, str], film_token.RegisteredKey] = {}

    def current(self) -> dict[tuple[str, str], film_token.RegisteredKey]:
        with self._lock:
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    self._keys = film_token.read_keys_file(self.path)
                    self._stamp = stamp
                    log(f"cloud-film: {len(self._keys)} node key(s) from {self.path}")
            except (OSError, ValueError) as exc:  # keep the last good store; say why once per change
                if self._stamp != (-1, -1):
                    log(f"cloud-film: cannot read keys file {self.path}: {exc}", error=True)
                    self._stamp = (-1, -1)
            return self._keys


def log(message: str, error: bool = False) -> None:
    if orthanc is not None:
        (orthanc.LogError if error else orthanc.LogWarning)(message)


class FilmRoutes:
    """The plugin's state: settings, the key store, the access log."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = KeyStore(settings.keys_file)
        self._log_lock = threading.Lock()

    # ----------------------------------------------------------- access

    def allow(self, uri: str, **request: Any) -> bool:
        """Orthanc's incoming-HTTP filter: film routes for anyone (the token decides), the rest for registered users."""
        if FILM_SPACE.match(uri) and ".." not in uri:  # the route itself answers 403 to a bad token
            return bool(request.get("method") == orthanc.HttpMethod.GET)
        if not self.settings.require_auth:
            return True
        header = str((request.get("headers") or {}).get("authorization", ""))
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            return False
        return any(hmac.compare_digest(value.strip(), known) for known in self.settings.credentials)

    def opened(self, what: str, claims: film_token.TokenClaims | None, outcome: str) -> None:
        """One line per opening: time, node, study, outcome; never a name, never the token."""
        node = claims.node_id if claims else "-"
        study = claims.study_uid if claims else "-"
        line = f"cloud-film: {what} node={node} study={study} outcome={outcome}"
        log(line)
        if self.settings.access_log is not None:
            entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "what": what, "node": node,
                     "study": study, "outcome": outcome}
            with self._log_lock, self.settings.access_log.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    # ----------------------------------------------------------- the route

    def serve(self, output: Any, uri: str, **request: Any) -> None:
        match = FILM_URI.match(uri)
        what = "page" if match is None or match.group(2) is None else (
            "image" if match.group(3) is not None else "pdf")
        if match is None or request.get("method") != "GET":
            return self.refuse(output, what, None, "malformed")
        token = match.group(1)
        try:
            claims = film_token.verify_token(token, self.keys.current())
        except film_token.TokenError as exc:
            try:
                readable: film_token.TokenClaims | None = film_token.read_claims(token)[0]
            except film_token.TokenError:
                readable = None
            return self.refuse(output, what, readable, exc.reason)
        study = self.find_study(claims.study_uid)
        if study is None:
            return self.refuse(output, what, claims, "no_such_study")
        try:
            if what == "image":
                self.answer_image(output, study, int(match.group(3)), request.get("get", {}).get("size") == "full",
                                  claims)
            elif what == "pdf":
                self.answer_pdf(output, study, claims)
            else:
                self.answer_page(output, study, token, claims)
        except LookupError:
            self.refuse(output, what, claims, "no_such_" + what)

    def refuse(self, output: Any, what: str, claims: film_token.TokenClaims | None, outcome: str) -> None:
        self.opened(what, claims, outcome)
        self._headers(output)
        output.SetHttpHeader("Content-Type", "text/html; charset=utf-8")
        body = film_page.refused_page()
        # SendHttpStatus keeps our page (SendHttpStatusCode would send an empty one); it takes text and its byte length.
        output.SendHttpStatus(403, body, len(body.encode("utf-8")))

    def _headers(self, output: Any) -> None:
        output.SetHttpHeader("Cache-Control", "no-store")
        output.SetHttpHeader("Referrer-Policy", "no-referrer")
        output.SetHttpHeader("X-Robots-Tag", "noindex")
        output.SetHttpHeader("X-Content-Type-Options", "nosniff")
        output.SetHttpHeader("Content-Security-Policy", "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'")

    # ----------------------------------------------------------- Orthanc's own REST, from inside

    def find_study(self, study_uid: str) -> str | None:
        found = json.loads(orthanc.RestApiPost("/tools/lookup", study_uid))
        ids = [f["ID"] for f in found if f.get("Type") == "Study"]
        return ids[0] if ids else None

    def _series(self, study: str) -> list[dict[str, Any]]:
        series: list[dict[str, Any]] = json.loads(orthanc.RestApiGet(f"/studies/{study}/series"))
        return series

    def images(self, study: str) -> list[str]:
        """The study's picture instances, by series then instance number; reports and key objects left out."""
        found: list[tuple[int, int, str]] = []
        for series in self._series(study):
            tags = series.get("MainDicomTags", {})
            if str(tags.get("Modality", "")).upper() in film_page.NOT_IMAGES:
                continue
            for instance in json.loads(orthanc.RestApiGet(f"/series/{series['ID']}/instances")):
                number = str(instance.get("MainDicomTags", {}).get("InstanceNumber", "0"))
                found.append((_int(tags.get("SeriesNumber")), _int(number), instance["ID"]))
        return [i for _, _, i in sorted(found)][:MAX_IMAGES]

    def report(self, study: str) -> tuple[str, dict[str, Any]] | None:
        """(instance id, simplified tags) of the study's current final report."""
        candidates: dict[str, dict[str, Any]] = {}
        for series in self._series(study):
            if str(series.get("MainDicomTags", {}).get("Modality", "")).upper() not in ("SR", "DOC"):
                continue
            for instance_id in series.get("Instances", []):
                tags = json.loads(orthanc.RestApiGet(f"/instances/{instance_id}/simplified-tags"))
                if isinstance(tags, dict):
                    candidates[instance_id] = tags
        current = film_page.current_report(list(candidates.values()))
        if current is None:
            return None
        return next((i, t) for i, t in candidates.items() if t is current)

    def answer_page(self, output: Any, study: str, token: str, claims: film_token.TokenClaims) -> None:
        info = json.loads(orthanc.RestApiGet(f"/studies/{study}"))
        tags = info.get("MainDicomTags", {})
        found = self.report(study)
        view = film_page.StudyView(
            exam=str(tags.get("StudyDescription", "")), study_date=str(tags.get("StudyDate", "")),
            patient_name=film_page.person_name(info.get("PatientMainDicomTags", {}).get("PatientName", "")),
            images=len(self.images(study)), report=film_page.report_of(found[1]) if found else None)
        self.opened("page", claims, "shown" if found else "shown_no_report")
        self._headers(output)
        output.AnswerBuffer(film_page.study_page(view, token).encode("utf-8"), "text/html; charset=utf-8")

    def answer_image(self, output: Any, study: str, n: int, full: bool, claims: film_token.TokenClaims) -> None:
        images = self.images(study)
        if n >= len(images):
            raise LookupError(n)
        width = FULL_WIDTH if full else PHONE_WIDTH
        png = orthanc.RestApiGet(f"/instances/{images[n]}/rendered?width={width}&height={width * 2}&smooth=1")
        self.opened("image", claims, "shown")
        self._headers(output)
        output.SetHttpHeader("Cache-Control", "private, max-age=600")
        output.AnswerBuffer(png, "image/png")

    def answer_pdf(self, output: Any, study: str, claims: film_token.TokenClaims) -> None:
        found = self.report(study)
        if found is None or found[1].get("SOPClassUID") != film_page.PDF_CLASS:
            raise LookupError("pdf")
        document = orthanc.RestApiGet(f"/instances/{found[0]}/content/0042-0011")
        if not document.startswith(b"%PDF-"):
            self.opened("pdf", claims, "not_a_pdf")
            raise LookupError("pdf")
        end = document.rfind(b"%%EOF")
        self.opened("pdf", claims, "shown")
        self._headers(output)
        output.SetHttpHeader("Content-Disposition", "inline; filename=\"report.pdf\"")
        output.AnswerBuffer(document[: end + 5] if end > 0 else document, "application/pdf")


def _int(value: Any) -> int:
    try:
        return int(str(value).strip() or 0)
    except ValueError:
        return 0


def register() -> FilmRoutes:
    """Read the configuration, register the routes and the filter; called once when Orthanc loads the script."""
    settings = Settings(json.loads(orthanc.GetConfiguration()))
    if settings.orthanc_auth:
        log("cloud-film: AuthenticationEnabled is true, so Orthanc asks phones for a password before this plugin "
            "runs: set it to false; the plugin's filter then requires RegisteredUsers on every other route", error=True)
    routes = FilmRoutes(settings)
    routes.keys.current()
    orthanc.RegisterRestCallback("/" + ROUTE + "/(.*)", routes.serve)
    orthanc.RegisterIncomingHttpRequestFilter(routes.allow)
    log(f"cloud-film: serving /{ROUTE}/<token>; keys from {settings.keys_file}; "
        f"other routes {'need RegisteredUsers' if settings.require_auth else 'are open (RequireAuthentication false)'}")
    return routes


if orthanc is not None:
    ROUTES = register()
