"""Clinic Edge: the node's core (config, store, DICOM service, console, ops, CLI)."""

__version__ = "0.1.0"
