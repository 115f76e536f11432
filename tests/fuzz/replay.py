"""Send one input the fuzz harness kept to a node again, to reproduce a finding by hand.

    python -m tests.fuzz.replay store CASE.dcm PORT [CALLED_AET]   # as a C-STORE (bytes unparsed)
    python -m tests.fuzz.replay pdu CASE.pdus PORT                # raw PDUs, as the harness sent them
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from pynetdicom import AE, _config


def store(path: Path, port: int, called: str = "EDGE") -> str:
    """The node's answer to the file's dataset bytes sent as they are."""
    from pynetdicom.dsutils import split_dataset

    meta, _ = split_dataset(path)
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="DR1")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return "association refused"
    answer = assoc.send_c_store(path)
    if assoc.is_established:
        assoc.release()
    if "Status" not in answer:
        return "no answer (aborted)"
    return f"status 0x{int(answer.Status):04X} {answer.get('ErrorComment', '')!r}"


def pdus(path: Path, port: int) -> str:
    """Each PDU of a kept case (length-prefixed in the file) on one connection; what came back."""
    data = path.read_bytes()
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        while data:
            n = int.from_bytes(data[:4], "big")
            sock.sendall(data[4 : 4 + n])
            data = data[4 + n :]
            try:
                answers.append(sock.recv(65536)[:16].hex())
            except (TimeoutError, OSError) as exc:
                answers.append(type(exc).__name__)
    return " | ".join(answers)


def main() -> None:
    kind, case, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    print(store(case, port, *sys.argv[4:5]) if kind == "store" else pdus(case, port))


if __name__ == "__main__":
    main()
