"""The sync part's ``edge doctor`` item: the cloud answers a QIDO-RS with our credentials."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.part import DoctorItem as Item

if TYPE_CHECKING:
    from edge.node.config import EdgeConfig

PROBE_UID = "2.25.1"  # a Study Instance UID nobody holds: QIDO proves reach and auth, returns no patient data


async def check_cloud(config: EdgeConfig) -> Item:
    """A QIDO-RS for a UID nobody holds: proves the link, TLS and the credentials."""
    from sync.cloud import CloudSetupError, load_auth_headers, open_session
    from sync.dicomweb import DicomWebClient, DicomWebError

    url = config.cloud.dicomweb_url
    try:
        headers = load_auth_headers(config.path(config.cloud.secrets_file))
        session = open_session(config)
    except CloudSetupError as exc:
        return Item("cloud", "fail", str(exc), "fix the secrets file (edge provision --token …) or the TLS files in [cloud]")
    try:
        await DicomWebClient(session, url, headers).find_instances(PROBE_UID, limit=1)
    except DicomWebError as exc:
        if exc.status in (401, 403):
            hint = "the cloud refused our credentials: get a new token and run edge provision --token …"
        elif exc.status is None:
            hint = "no answer: check the uplink (router, SIM credit) and [cloud] dicomweb_url"
        else:
            hint = "the cloud answered but not as DICOMweb: check [cloud] dicomweb_url (the DICOMweb root)"
        return Item("cloud", "fail", f"QIDO-RS to {url}: {exc}", hint)
    finally:
        await session.close()
    auth = "authenticated" if headers else "no credentials configured"
    return Item("cloud", "pass", f"QIDO-RS to {url}: answered ({auth})")
