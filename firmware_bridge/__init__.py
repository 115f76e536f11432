"""ECG collection boxes over serial (see issue: wire protocol, sessions, DICOM ECG)."""
