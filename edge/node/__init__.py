"""The roof: the node put together from its parts.

Everything here may import every package (that is its job); nothing below imports it at
run time. The whole edge.toml (``config``), the parts in start order (``parts``), starting
and stopping their services (``services``), ``edge run``'s supervisor and the ``edge``
command live here. The console and ops (doctor, status, heartbeat) are roof too: they read
every part. See README "Layout".
"""
