"""The node's DICOM service (pynetdicom): C-ECHO, durable C-STORE and the worklist C-FIND.

Where the node reaches into pynetdicom's internals, and why; each is installed by
``DicomService.start()`` (``edge.dicom.patches.install()``, never at import: importing the node
leaves pynetdicom as it is, tests/edge/test_dicom_patches.py), which first refuses a pynetdicom
version the patches were not written for (``patches.KNOWN_PYNETDICOM_VERSIONS``), and each is
covered by a test that fails if a pynetdicom upgrade moves it:

- ``receive_file``: the temp file a C-STORE streams into survives a full disk, so the
  modality gets 0xA700 instead of an abort (the full-disk tests in tests/edge/test_bad_input.py);
  it is made in the spool's temp folder with ``dir=`` (``tempfile.tempdir`` is left alone).
  It also stops at ``[storage] max_instance_mb``: the rest of an endless data set is dropped
  and the C-STORE answered 0xA700 (tests/edge/test_dimse_memory.py).
- ``assembly``: ``DIMSEMessage.decode_msg`` wrapped so a received message's command set
  (64 KiB) and in-memory data set (1 MiB; every one but a C-STORE's) cannot grow without
  bound, and a peer with ``DIMSE_MESSAGES_WAITING_MAX`` requests in pynetdicom's
  ``msg_queue`` cannot add more; past either the association is aborted in one line
  (tests/edge/test_dimse_memory.py streams never-ending C-FIND identifiers and command sets,
  and pipelined C-ECHO-RQs, at a running node). ``PduReader`` (``pdu_reader``) likewise refuses a
  PDU longer than ``max_pdu_bytes`` from its header (same test file).
- ``UID.__deepcopy__`` returns the UID itself: pynetdicom deep-copies thousands of
  presentation-context UIDs per association, re-validating each (36 -> 2 ms).
- ``connections``: the server decides at TCP accept who gets an association slot
  (``verify_request``, ``slots.SlotTable``), the association's thread gives it back (its
  ``run`` wrapped), and ``pdu_reader.PduReader`` replaces ``AssociationSocket.recv``: a few
  large reads instead of 4 KiB pieces, a deadline for every PDU, ACK at once (TCP_QUICKACK)
  and send without Nagle (TCP_NODELAY): DCMTK's split header/body writes otherwise wait
  ~40 ms for a delayed ACK.
  Every ingest test reads through it; test_bad_input.py sends it broken PDUs and absurd
  lengths, tests/edge/test_dr_not_held_out.py stalls it.
- ``connections``, a thread that raises: ``Association.run`` and ``DULServiceProvider.run``
  (an instance's attributes, the DUL's ``Thread.run``) are wrapped so that any exception in
  either (``InvalidEventError`` in the state machine, ``ValueError`` making an A-ASSOCIATE
  request of an even context id, ``IndexError`` negotiating a context without transfer
  syntax) ends the association with an A-ASSOCIATE-RJ or A-ABORT, a close, the slot given
  back and one warning line; it sets ``Association._kill``, ``is_aborted``/``is_rejected``
  and ``StateMachine.transition`` and fires ``EVT_CONN_CLOSE`` as pynetdicom's own close
  does (tests/fuzz/test_pdu_fuzz.py: ``test_pipelined_p_data_for_an_unproposed_context_gives_its_slot_back``,
  ``test_requests_pynetdicom_cannot_take_end_cleanly_in_one_line``).
- ``peer_log``, logging filters on pynetdicom's loggers (they match its message texts):
  the traceback it logs for every PDU it cannot decode becomes one line with the peer, its
  "Unknown PDU type" line once per connection, the state machine's lines before it
  re-raises are left to the wrapper above, and at most ``LINES_PER_CONNECTION`` lines per
  connection thread, control characters replaced (``test_an_undecodable_pdu_is_one_line_without_traceback``;
  the PDU fuzz campaign counts log bytes per conversation).
- ``find_responses``: worklist answers encoded once per item, and the pending C-FIND-RSP
  command set encoded once per query (tests/edge/test_find_responses.py holds the bytes
  to pynetdicom's own encoder and decoder).
"""
