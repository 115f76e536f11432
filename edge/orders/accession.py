"""Accession numbers: unique per node, carrying the node id, within DICOM SH (16 characters).

``<tag>-<seq>``: the tag is the node id in capitals without dashes (long ids keep their
first 4 and last 5 characters, so ``clinic-0001`` is ``CLINC0001``) and seq is the
node's order counter, at least 6 digits (the dash goes when a long tag
meets a 7-digit counter). The tag tells the cloud's readers which clinic
an order came from; the counter makes it unique on this node.
"""

from __future__ import annotations

import re

SH_MAX = 16
TAG_MAX = 9
SEQ_DIGITS = 6


def node_tag(node_id: str) -> str:
    """The node id squeezed into at most 9 characters."""
    tag = re.sub(r"[^A-Z0-9]", "", node_id.upper())
    return tag if len(tag) <= TAG_MAX else tag[:4] + tag[-5:]


def accession_number(node_id: str, seq: int) -> str:
    value = f"{node_tag(node_id)}-{seq:0{SEQ_DIGITS}d}"
    if len(value) > SH_MAX:  # past a million orders on a long node id, the dash makes room
        value = value.replace("-", "", 1)
    if len(value) > SH_MAX:
        raise ValueError(f"order counter {seq} no longer fits an accession number")
    return value
