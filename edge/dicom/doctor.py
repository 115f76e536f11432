"""The DICOM part's ``edge doctor`` items: the DR answers a C-ECHO, who may read the worklist and store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.dicom.modalities import configured_modalities
from edge.part import DoctorItem as Item

if TYPE_CHECKING:
    from edge.node.config import EdgeConfig


def check_worklist(config: EdgeConfig) -> Item:
    """Who may read the worklist: closed until a modality (AE title and address) is configured."""
    cfg = config.dicom
    modalities = configured_modalities(cfg)
    if not modalities:
        return Item("worklist", "warn", "closed: no modality configured, so the DR cannot read the day's orders",
                    "set [dicom] modality_host to the DR's address and modality_ae to the AE title it calls with "
                    "(a second modality: other_modalities = [\"AE@host\"]), then restart")
    days = ("today" if not (cfg.worklist_days_back or cfg.worklist_days_ahead)
            else f"today -{cfg.worklist_days_back}/+{cfg.worklist_days_ahead} days")
    peers = ", ".join(f"{m.ae_title}@{m.host}" for m in modalities)
    return Item("worklist", "pass", f"answers only {peers}; {days}")


def check_calling_aets(config: EdgeConfig) -> Item:
    """C-STORE is open to any calling AE on a first run; say so until the clinic closes it."""
    allowed = config.dicom.allowed_calling_aets
    if not allowed:
        return Item("c-store", "warn", "any calling AE title may store images ([dicom] allowed_calling_aets is empty)",
                    f"set [dicom] allowed_calling_aets = [\"{config.dicom.modality_ae}\"] (the DR's AE title) "
                    "once the DR sends")
    return Item("c-store", "pass", f"only {', '.join(allowed)} may store images")


def check_dr(config: EdgeConfig) -> Item:
    """C-ECHO to the configured modality, with our own AE title as the caller."""
    cfg = config.dicom
    if not cfg.modality_host:
        return Item("dr", "skip", "no DR configured", "set [dicom] modality_host (and modality_ae, modality_port) or run edge provision")
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    target = f"{cfg.modality_ae}@{cfg.modality_host}:{cfg.modality_port}"
    ae = AE(ae_title=cfg.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate(cfg.modality_host, cfg.modality_port, ae_title=cfg.modality_ae)
    try:
        if assoc.is_rejected:
            return Item("dr", "fail", f"{target} rejected the association",
                        f"on the DR, add this node as a DICOM peer (AE {cfg.ae_title}); check [dicom] modality_ae matches the DR's AE title")
        if not assoc.is_established:
            return Item("dr", "fail", f"no DICOM answer from {target}",
                        "is the DR switched on and cabled? check [dicom] modality_host and modality_port (ping it)")
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        if code == 0x0000:
            return Item("dr", "pass", f"C-ECHO to {target}: success")
        return Item("dr", "fail", f"C-ECHO to {target} answered {code!r}", "the DR refused Verification; check its DICOM settings")
    finally:
        if assoc.is_established:
            assoc.release()
