"""ECG collection boxes over serial: wire protocol, box sessions, DICOM 12-lead ECG, software box."""
