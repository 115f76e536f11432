"""Orders: the visits a technician registers, the worklist the DR reads, and matching studies to them.

Owns its tables (``edge.orders.tables``); the console writes through :mod:`edge.orders.register`
and :mod:`edge.orders.matching`, the DICOM service reads :mod:`edge.dicom.worklist`.
"""
