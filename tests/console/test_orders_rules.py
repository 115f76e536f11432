"""The rules a technician meets at registration, checked without a node: SA ID numbers, accession numbers, names."""

from __future__ import annotations

import datetime as dt

import pytest

from edge.orders.accession import accession_number, node_tag
from edge.orders.register import FormErrors, Registration, exam_choices, validate
from edge.orders.said import BadIdNumber, check_id_number
from edge.dicom.worklist import BadQuery, date_range, matches

TODAY = dt.date(2026, 11, 23)
CHOICES = exam_choices(["Knee X-ray"], "DX")


@pytest.mark.parametrize("number", ["8001015009087", "800101 5009 087", "0002290001086"])
def test_valid_sa_id_numbers_are_accepted(number: str) -> None:
    assert check_id_number(number, today=TODAY) == number.replace(" ", "")


@pytest.mark.parametrize(("number", "why"), [
    ("8001015009088", "check digit"),          # one digit off
    ("800101500908", "exactly 13 digits"),    # too short
    ("80010150090X7", "exactly 13 digits"),
    ("8013015009086", "not a real date"),     # month 13
    ("0102290001089", "not a real date"),     # 29 Feb 2001
    ("8001015009383", "11th digit"),          # citizenship 3
])
def test_bad_sa_id_numbers_are_refused_with_a_reason(number: str, why: str) -> None:
    with pytest.raises(BadIdNumber, match=why):
        check_id_number(number, today=TODAY)


def test_id_number_must_agree_with_the_date_of_birth() -> None:
    with pytest.raises(BadIdNumber, match="says born 1980-01-01"):
        check_id_number("8001015009087", dt.date(1980, 1, 2), TODAY)


def test_accession_numbers_carry_the_node_and_fit_dicom_sh() -> None:
    assert node_tag("clinic-0001") == "CLINC0001"
    assert node_tag("kzn-12") == "KZN12"
    assert accession_number("clinic-0001", 1) == "CLINC0001-000001"
    assert len(accession_number("a-very-long-node-name-0099", 9_999_999)) == 16
    with pytest.raises(ValueError):
        accession_number("clinic-0001", 10**8)


def test_registration_names_every_bad_field_at_once() -> None:
    with pytest.raises(FormErrors) as caught:
        validate(Registration(surname="", sex="", id_number="123", exam="MRI"), CHOICES, TODAY)
    assert set(caught.value.errors) == {"surname", "sex", "id_number", "exam"}


def test_registration_without_id_needs_folder_number_and_birth_date() -> None:
    with pytest.raises(FormErrors) as caught:
        validate(Registration(surname="Nkosi", sex="M", folder_number="F-1", exam="ECG"), CHOICES, TODAY)
    assert set(caught.value.errors) == {"birth_date"}
    patient = validate(Registration(surname="Nkosi", given_names="Sipho", sex="M", folder_number="F-1",
                                    birth_date="1975-03-02", exam="Knee X-ray"), CHOICES, TODAY)
    assert (patient.patient_name, patient.patient_id, patient.birth_date) == ("Nkosi^Sipho", "F-1", "19750302")
    assert (patient.exam.exam, patient.exam.modality) == ("Knee X-ray", "DX")


def test_worklist_dates_and_wildcards() -> None:
    assert date_range("", TODAY) == ("20261123", "20261123")
    assert date_range("20261101-20261130", TODAY) == ("20261101", "20261130")
    assert date_range("-20261130", TODAY) == ("00000000", "20261130")
    for bad in ("2026-11-23x", "20261131", "20261130-20261101", "-"):
        with pytest.raises(BadQuery):
            date_range(bad, TODAY)
    assert matches("DLA*", "DLAMINI^THANDI") and matches("dla*", "Dlamini^Thandi", fold=True)
    assert matches("D?", "DX") and not matches("CR", "DX") and matches("", "anything")
