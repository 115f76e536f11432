"""Names the kiosk shares between its modules."""

from __future__ import annotations

from typing import Final, Literal

KIOSK_DIR: Final = "kiosk"
"""Under the data dir: the node's token key (when no key file is configured)."""

TOKEN_KEY_NAME: Final = "film-key.pem"  # the node's Ed25519 private key (PEM, mode 600)

CODE_DIGITS: Final = 10  # nine random digits and a Luhn check digit

# One audit row per event; ``action`` says what was tried, ``outcome`` how it ended.
AuditAction = Literal["issue", "lookup", "print", "reprint_allowed", "reissue"]
LOOKUP_OUTCOMES: Final = (
    "checking", "ready", "not_ready", "wrong_pin", "unknown_code", "bad_code", "locked", "throttled", "expired",
    "revoked",  # the slip was replaced by a reissued one (the patient reads "expired": ask at reception)
)
PRINT_OUTCOMES: Final = ("printing", "printed", "failed", "limit_reached", "printer_unavailable", "amended_extra")
# "amended_extra": beside the print that used the one extra an amended-after-printing report allows.
# "checking": a try counted before its PIN is checked, so tries at once see each other.
FAILED_LOOKUPS: Final = frozenset({"checking", "wrong_pin", "unknown_code"})
PIN_FAILURES_KEPT_DAYS: Final = 1  # a code's wrong PINs are forgotten after a quiet day (unknown codes too)
COUNTED_PRINTS: Final = ("printing", "printed")

# Why a report is not ready, for the "come back" screen: images on their way to the cloud, with
# the doctor, a draft being written, or longer than [kiosk] report_estimate_hours since they arrived there.
NotReady = Literal["uploading", "with_doctor", "writing", "overdue"]

PrinterState = Literal["ok", "offline", "paper_out", "job_failed", "unknown"]
PRINTER_STATES: Final = ("ok", "offline", "paper_out", "job_failed", "unknown")
