"""The node's store: SQLite (WAL, synchronous=FULL) plus the spool of Part 10 files.

Every package meets here. Writes go through :func:`edge.store.db.write_transaction`, one
writer at a time per process, with SQLite's busy timeout between processes.
"""
