"""Registering a visit: validate what the technician typed, then create the visit and its order.

Validation returns every problem at once, each in plain words next to its field, so the
technician fixes the form in one go. The order gets an accession number and a Study
Instance UID up front: the DR copies both from the worklist, so images arrive matched.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field

from peewee import fn

from edge.orders.accession import accession_number
from edge.orders.const import CHEST_XRAY, ECG_EXAM, ECG_MODALITY, SEXES
from edge.orders.said import BadIdNumber, birth_date, check_id_number
from edge.orders.tables import Order, Visit, audit
from edge.store.db import write_transaction

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[^\\^=\x00-\x1f]{1,30}$")  # no PN delimiters or control characters
_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9/._-]{0,31}$")


@dataclass(frozen=True)
class ExamChoice:
    exam: str
    modality: str


def exam_choices(extra_exams: list[str], xray_modality: str) -> list[ExamChoice]:
    """Chest X-ray first, the clinic's own X-ray exams, then ECG."""
    names = [CHEST_XRAY] + [e for e in extra_exams if e and e not in (CHEST_XRAY, ECG_EXAM)]
    return [ExamChoice(n, xray_modality) for n in dict.fromkeys(names)] + [ExamChoice(ECG_EXAM, ECG_MODALITY)]


@dataclass(frozen=True)
class Registration:
    """The form as typed; :func:`validate` turns it into a :class:`Patient` or field errors."""

    surname: str = ""
    given_names: str = ""
    sex: str = ""
    birth_date: str = ""  # YYYY-MM-DD from the date input
    id_number: str = ""
    folder_number: str = ""
    exam: str = ""


@dataclass(frozen=True)
class Patient:
    patient_name: str  # DICOM PN
    patient_id: str
    id_kind: str
    birth_date: str  # YYYYMMDD
    sex: str
    exam: ExamChoice


@dataclass
class FormErrors(Exception):
    """Field name → message, shown beside each field."""

    errors: dict[str, str] = field(default_factory=dict)


def validate(form: Registration, choices: list[ExamChoice], today: dt.date | None = None) -> Patient:
    """The patient to register, or FormErrors naming every bad field."""
    today = today or dt.date.today()
    errors: dict[str, str] = {}
    surname, given = " ".join(form.surname.split()), " ".join(form.given_names.split())
    if not surname:
        errors["surname"] = "Enter the patient's surname."
    elif not _NAME.match(surname):
        errors["surname"] = "The surname may not contain ^, =, \\ or be longer than 30 letters."
    if given and not _NAME.match(given):
        errors["given_names"] = "First names may not contain ^, =, \\ or be longer than 30 letters."
    if form.sex not in SEXES:
        errors["sex"] = "Choose female, male or other."
    born: dt.date | None = None
    if form.birth_date.strip():
        try:
            born = dt.date.fromisoformat(form.birth_date.strip())
        except ValueError:
            errors["birth_date"] = "The date of birth is not a date: write it as YYYY-MM-DD, e.g. 1980-01-31."
        else:
            if born > today or born.year < today.year - 130:
                errors["birth_date"] = "The date of birth cannot be in the future or over 130 years ago."
                born = None
    id_number, folder = form.id_number.strip(), form.folder_number.strip()
    patient_id, id_kind = "", ""
    if id_number:
        try:
            patient_id, id_kind = check_id_number(id_number, born, today), "said"
        except BadIdNumber as exc:
            errors["id_number"] = str(exc)
        else:
            if born is None and "birth_date" not in errors:
                born = birth_date(patient_id, today)
    elif folder:
        if _FOLDER.match(folder):
            patient_id, id_kind = folder, "folder"
        else:
            errors["folder_number"] = "A folder number is letters and digits (and / . - _), at most 32."
    else:
        errors["id_number"] = "Enter the SA ID number, or the clinic folder number if there is none."
    if born is None and not {"birth_date", "id_number"} & errors.keys() and id_kind != "said":
        errors["birth_date"] = "Enter the date of birth."
    exam = next((c for c in choices if c.exam == form.exam), None)
    if exam is None:
        errors["exam"] = "Choose the exam."
    if errors:
        raise FormErrors(errors)
    assert exam is not None and born is not None
    return Patient(
        patient_name=f"{surname}^{given}" if given else surname,
        patient_id=patient_id,
        id_kind=id_kind,
        birth_date=born.strftime("%Y%m%d"),
        sex=form.sex,
        exam=exam,
    )


def create_order(patient: Patient, *, node_id: str, station_ae: str, by: str, client: str = "",
                 now: dt.datetime | None = None) -> Order:
    """The visit and its scheduled order, with a fresh accession number, in one transaction."""
    from pydicom.uid import generate_uid  # here, not at import: the console starts without pydicom

    local = now or dt.datetime.now()
    with write_transaction():
        seq = int(Order.select(fn.COALESCE(fn.MAX(Order.seq), 0)).scalar() or 0) + 1
        visit = Visit.create(
            patient_name=patient.patient_name, patient_id=patient.patient_id, id_kind=patient.id_kind,
            birth_date=patient.birth_date, sex=patient.sex, registered_by=by,
        )
        order = Order.create(
            visit=visit, seq=seq, accession_number=accession_number(node_id, seq),
            study_instance_uid=generate_uid(), exam=patient.exam.exam, modality=patient.exam.modality,
            station_ae="" if patient.exam.modality == ECG_MODALITY else station_ae,
            scheduled_date=local.strftime("%Y%m%d"), scheduled_time=local.strftime("%H%M%S"),
        )
        audit(by, "register", order, f"{patient.exam.exam} ({patient.exam.modality})", client)
    log.info("orders: order %d registered as %s (%s) by %s", order.id, order.accession_number, order.modality, by)
    return order


def set_ticket(order_id: int, code: str) -> None:
    with write_transaction():
        Order.update(ticket_code=code).where(Order.id == order_id).execute()
