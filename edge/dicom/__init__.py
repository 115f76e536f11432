"""The node's DICOM service (pynetdicom): C-ECHO and durable C-STORE from the X-ray."""
