"""The node's DICOM service (pynetdicom): C-ECHO, durable C-STORE and the worklist C-FIND.

Where the node reaches into pynetdicom's internals, and why; each is installed at import
of ``edge.dicom.service`` and covered by a test that fails if a pynetdicom upgrade moves it
(hence ``pynetdicom>=3.0,<3.1`` in pyproject.toml):

- ``receive_file``: the temp file a C-STORE streams into survives a full disk, so the
  modality gets 0xA700 instead of an abort (the full-disk tests in tests/edge/test_bad_input.py).
- ``UID.__deepcopy__`` returns the UID itself: pynetdicom deep-copies thousands of
  presentation-context UIDs per association, re-validating each (36 -> 2 ms).
- ``connections``: the server decides at TCP accept who gets an association slot
  (``verify_request``), the association's thread gives it back (its ``run`` wrapped), and
  ``PduReader`` replaces ``AssociationSocket.recv``: a few large reads instead of 4 KiB
  pieces, a deadline for every PDU, ACK at once (TCP_QUICKACK) and send without Nagle
  (TCP_NODELAY): DCMTK's split header/body writes otherwise wait ~40 ms for a delayed ACK.
  Every ingest test reads through it; test_bad_input.py sends it broken PDUs and absurd
  lengths, tests/edge/test_dr_not_held_out.py stalls it.
- ``find_responses``: worklist answers encoded once per item, and the pending C-FIND-RSP
  command set encoded once per query (tests/edge/test_find_responses.py holds the bytes
  to pynetdicom's own encoder and decoder).
"""
