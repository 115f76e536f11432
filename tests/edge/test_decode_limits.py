"""A stranger's C-STORE cannot take the node's memory: decoding is capped in decoded bytes.

A real node process receives, from pynetdicom proposing Deflated Explicit VR Little
Endian, a 0.5 MB deflate bomb that inflates to 512 MiB, and an explicit VR file of 2
million tiny elements (20 MB). The DR's side sees 0xA700 with a comment naming the limit;
nothing is kept; the node's peak resident memory (VmHWM) stays under 350 MB; an ordinary
deflated image right after is kept byte for byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread

from edge.store.walk import DecodeLimits, walk_instance
from tests.conftest import EdgeNode
from tests.dicom_factory import DX_STORAGE, make_dx
from tests.edge.helpers import echo_succeeds, query, raw_store, spool_files, temp_files
from tests.edge.hostile_files import MiB, peak_rss_mb, write_deflate_bomb, write_deflated_dx, write_element_flood

DEFLATED = "1.2.840.10008.1.2.1.99"
STATUS_OUT_OF_RESOURCES = 0xA700
NODE_MEMORY_CAP_MB = 350


def kept_count(node: EdgeNode) -> int:
    return int(query(node, "select count(*) from instance")[0][0])


def assert_not_kept(node: EdgeNode, sop_uid: str) -> None:
    assert query(node, "select count(*) from instance where sop_instance_uid = ?", sop_uid) == [(0,)]
    assert not any(sop_uid in p.name for p in spool_files(node))
    assert temp_files(node) == []


def dataset_bytes(path: Path) -> bytes:
    """The dataset as encoded (after the file meta): what travelled in the C-STORE."""
    walked = walk_instance(path, DecodeLimits(max_bytes=4096 * MiB, max_deflate_ratio=1e6, max_elements=10**8))
    return path.read_bytes()[walked.dataset_offset :]


def test_deflate_bomb_and_element_flood_get_out_of_resources_and_the_node_stays_small(
    node: EdgeNode, tmp_path: Path
) -> None:
    assert node.proc is not None
    bomb = tmp_path / "bomb.dcm"
    bomb_uid = write_deflate_bomb(bomb, inflated_bytes=512 * MiB)
    assert bomb.stat().st_size < MiB
    flood = tmp_path / "flood.dcm"
    flood_uid = write_element_flood(flood, elements=2_000_000)
    assert flood.stat().st_size > 19_000_000

    status, comment = raw_store(node, bomb, DX_STORAGE, DEFLATED)
    assert (status, comment) == (STATUS_OUT_OF_RESOURCES, "inflates over 50x ([storage] max_deflate_ratio)")
    assert_not_kept(node, bomb_uid)

    status, comment = raw_store(node, flood, DX_STORAGE)
    assert (status, comment) == (STATUS_OUT_OF_RESOURCES, "over 200000 elements ([storage] max_elements)")
    assert_not_kept(node, flood_uid)

    good = tmp_path / "good.dcm"
    good_uid = write_deflated_dx(good)
    assert raw_store(node, good, DX_STORAGE, DEFLATED) == (0, "")
    [kept] = spool_files(node)
    assert kept.name == f"{good_uid}.dcm"
    assert dataset_bytes(kept) == dataset_bytes(good)  # byte-identical as it came
    assert dcmread(kept).PixelData == dcmread(good).PixelData
    assert query(node, "select transfer_syntax from instance") == [(DEFLATED,)]

    assert echo_succeeds(node)
    peak = peak_rss_mb(node.proc.pid)
    assert peak < NODE_MEMORY_CAP_MB, f"node peaked at {peak:.0f} MB"
    log = node.log_text()
    refusals = [line for line in log.splitlines() if "refused instance" in line]
    assert any(bomb_uid in line and "max_deflate_ratio" in line for line in refusals), refusals
    assert any(flood_uid in line and "max_elements" in line for line in refusals), refusals
    assert "Traceback" not in log


def test_instance_size_cap_holds_for_plain_and_deflated_data(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory(storage={"max_instance_mb": 16, "max_deflate_ratio": 10000}).start()
    bomb = tmp_path / "bomb.dcm"
    bomb_uid = write_deflate_bomb(bomb, inflated_bytes=64 * MiB)  # ~1000x: allowed by this ratio
    big = tmp_path / "big.dcm"
    big_ds = make_dx(big, rows=3000, cols=3000)  # 18 MB uncompressed, as a large DR image is

    status, comment = raw_store(node, bomb, DX_STORAGE, DEFLATED)
    assert (status, comment) == (STATUS_OUT_OF_RESOURCES, "inflates past 16 MB ([storage] max_instance_mb)")
    assert_not_kept(node, bomb_uid)
    status, comment = raw_store(node, big, DX_STORAGE)
    assert (status, comment) == (STATUS_OUT_OF_RESOURCES, "larger than 16 MB ([storage] max_instance_mb)")
    assert_not_kept(node, str(big_ds.SOPInstanceUID))

    small = tmp_path / "small.dcm"
    make_dx(small, rows=256, cols=256)
    assert raw_store(node, small, DX_STORAGE) == (0, "")
    assert kept_count(node) == 1


def test_the_ecg_bridge_keeps_recordings_under_the_configured_limits(tmp_path: Path) -> None:
    """The bridge called keep_instance with the default limits; it now uses [storage]'s, as C-STORE does."""
    import asyncio

    import numpy as np

    from edge.node.config import parse_config
    from edge.store.db import database, open_database
    from edge.store.spool import Spool
    from firmware_bridge.const import Msg
    from firmware_bridge.protocol import Frame, Hello, RecEnd, RecStart, Samples
    from firmware_bridge.service import BridgeService
    from firmware_bridge.session import BoxSession

    config = parse_config({"node": {"id": "test-node", "name": "Test Clinic"},
                           "storage": {"data_dir": str(tmp_path / "var"), "min_free_mb": 0, "max_elements": 5000},
                           "bridge": {"ports": [str(tmp_path / "no-such-port")], "port_glob": ""}}, tmp_path)
    open_database(config.data_dir)
    try:
        spool = Spool(config.data_dir)

        async def sessions_made() -> list[BoxSession]:
            service = BridgeService(config, spool)
            await service.start()
            try:
                return list(service.sessions.values())
            finally:
                await service.stop()

        sessions = asyncio.run(sessions_made())
        assert [s.limits for s in sessions] == [DecodeLimits.from_storage(config.storage)]
        assert sessions[0].limits.max_elements == 5000  # type: ignore[union-attr]

        # A session under limits that a 12-lead ECG exceeds refuses it as C-STORE would, and
        # tells the box not to offer it again (NAK UNSUPPORTED: it will never fit).
        session = BoxSession("test-port", config.bridge, spool, limits=DecodeLimits(max_elements=10))
        sent = bytearray()
        session._writer = type("W", (), {"write": lambda self, data: sent.extend(data)})()  # type: ignore[assignment]
        hello = Hello("ECG-1", "sim", "1.0", 500, 2500)
        n = 200  # samples per lead, in one SAMPLES message (at most 255)
        frames = [(Msg.HELLO, hello.pack()), (Msg.REC_START, RecStart(1, 500, n).pack()),
                  (Msg.SAMPLES, Samples(1, 0, np.zeros((n, len(hello.leads)), "<i2")).pack()),
                  (Msg.REC_END, RecEnd(1, n).pack())]

        async def feed() -> None:
            for seq, (kind, payload) in enumerate(frames):
                await session._on_frame(Frame(1, kind, seq, payload))

        asyncio.run(feed())
        assert session.stats.kept == [] and session.stats.refused_recordings == 1
        assert session.stats.not_kept == 0  # not "disk full, offer it again later"
        assert spool_files_of(config.data_dir) == []
    finally:
        database.close()


def spool_files_of(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "spool").glob("*/*.dcm"))
