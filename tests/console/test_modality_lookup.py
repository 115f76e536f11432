"""The worklist's "is this one of ours?" never waits for DNS, and a failed lookup is retried within seconds.

Before: the directory held its lock while it resolved ``modality_host``; with the clinic's
DNS down every worklist and accept thread queued behind a lookup that takes the resolver's
timeout, and a failed lookup locked the DR out for 60 s.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from edge.config.sections import DicomSection
from edge.dicom import modalities
from edge.dicom.modalities import RETRY_FAILED_S, ModalityDirectory

DR_ADDRESS = "10.0.0.20"


def _answer(address: str) -> list[Any]:
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, 0))]


def _section() -> DicomSection:
    return DicomSection(modality_ae="DR", modality_host="dr.clinic.lan", other_modalities=["CR1@127.0.0.3"])


def test_askers_do_not_wait_for_a_hanging_lookup_and_only_one_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    dns_answers = threading.Event()
    calls: list[str] = []

    def hanging(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        calls.append(host)
        assert dns_answers.wait(30), "the test never let DNS answer"
        return _answer(DR_ADDRESS)

    monkeypatch.setattr(modalities.socket, "getaddrinfo", hanging)
    directory = ModalityDirectory(_section())
    answers: list[tuple[bool, bool, bool]] = []

    def ask() -> None:
        answers.append((directory.is_modality("DR", DR_ADDRESS), directory.is_modality("CR1", "127.0.0.3"),
                        directory.is_modality_address(DR_ADDRESS)))

    askers = [threading.Thread(target=ask) for _ in range(8)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(20)
    try:
        assert not any(t.is_alive() for t in askers), "an asker waited for DNS"  # before: all 8 queued on the lock
        assert answers == [(False, True, False)] * 8  # the name has no answer yet; the literal address needs none
        assert calls == ["dr.clinic.lan"]  # one resolver at a time
    finally:
        dns_answers.set()
    assert directory.wait_resolved(20)
    assert directory.is_modality("DR", DR_ADDRESS) and directory.is_modality("DR", f"::ffff:{DR_ADDRESS}")
    assert not directory.is_modality("DR", "10.0.0.99") and not directory.is_modality("OTHER", DR_ADDRESS)


def test_a_failed_lookup_is_retried_within_seconds_and_an_outage_keeps_the_last_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    dns_up = [False]
    calls: list[float] = []

    def lookup(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        calls.append(now[0])
        if not dns_up[0]:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return _answer(DR_ADDRESS)

    monkeypatch.setattr(modalities.socket, "getaddrinfo", lookup)
    directory = ModalityDirectory(_section(), clock=lambda: now[0])

    def ask() -> bool:
        answer = directory.is_modality("DR", DR_ADDRESS)
        assert directory.wait_resolved(20)
        return answer

    assert directory.wait_resolved(20) and calls == [0.0]  # the first lookup starts with the directory: it fails
    now[0] = RETRY_FAILED_S - 1
    assert not ask() and calls == [0.0]  # not again at once ...
    dns_up[0] = True
    now[0] = RETRY_FAILED_S
    ask()
    assert calls == [0.0, RETRY_FAILED_S]  # ... but after 5 s, not 60 (before: the DR was locked out a minute)
    assert ask()

    dns_up[0] = False  # DNS goes down after the DR was known
    now[0] += modalities.RESOLVE_EVERY_S
    ask()
    assert len(calls) == 3 and ask()  # the failed refresh keeps the last good addresses
    now[0] += RETRY_FAILED_S
    ask()
    assert len(calls) == 4  # and is tried again soon
