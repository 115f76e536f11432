"""Names the orders package shares with the console and the worklist."""

from __future__ import annotations

from typing import Final, Literal

CHEST_XRAY: Final = "Chest X-ray"
ECG_EXAM: Final = "ECG"
ECG_MODALITY: Final = "ECG"

Sex = Literal["M", "F", "O"]
SEXES: Final = ("F", "M", "O")

# How a study came to belong to an order (StudyMatch.how).
MatchHow = Literal["study_uid", "accession", "patient_date", "assigned", "none"]

# What the technician sees per visit, in the order a visit moves through them.
VisitState = Literal["waiting", "received", "uploading", "in_cloud", "report_ready", "printed"]
VISIT_STATES: Final = ("waiting", "received", "uploading", "in_cloud", "report_ready", "printed")
