"""pynetdicom is changed by the DICOM service's start(), not by importing the node, and only a known version.

Each check runs in a fresh interpreter: the test process may already hold a started service.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

_SCRIPT = r'''
import asyncio, json, logging, sys, tempfile
from pathlib import Path

import pynetdicom
from pydicom.uid import UID
from pynetdicom import _config, dimse_messages, dsutils, service_class
from pynetdicom.dimse import DIMSEServiceProvider

def pynetdicom_state():
    probe = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")  # as pynetdicom calls it
    probe.close()
    Path(probe.name).unlink()
    return {
        "chunked": _config.STORE_RECV_CHUNKED_DATASET,
        "request_identifiers_logged": _config.LOG_REQUEST_IDENTIFIERS,
        "temp_file_class": dimse_messages.NamedTemporaryFile.__module__,
        "decode_msg": dimse_messages.DIMSEMessage.decode_msg.__module__,
        "send_msg": DIMSEServiceProvider.send_msg.__module__,
        "identifier_encoder": service_class.encode is dsutils.encode,
        "uid_deepcopy": "__deepcopy__" in UID.__dict__,
        "dul_log_filters": len(logging.getLogger("pynetdicom.dul").filters),
        "gettempdir": tempfile.gettempdir(),
        "cstore_temp_folder": str(Path(probe.name).parent),
    }

data_dir, port, version = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
import edge.dicom.service
from edge.dicom.service import DicomService
from edge.node.config import parse_config
from edge.service import ServiceSetupError
from edge.store.spool import Spool

out = {"after_import": pynetdicom_state()}
config = parse_config({"node": {"id": "test-node"}, "storage": {"data_dir": str(data_dir), "min_free_mb": 0},
                       "dicom": {"port": port, "bind_address": "127.0.0.1"}}, data_dir)
spool = Spool(config.data_dir)
out["spool_tmp"] = str(spool.tmp)
if version:
    pynetdicom.__version__ = version
service = DicomService(config, spool)
try:
    asyncio.run(service.start())
except ServiceSetupError as exc:
    out["refused"] = str(exc)
else:
    out["after_start"] = pynetdicom_state()
    asyncio.run(service.stop())
    asyncio.run(service.start())  # a second start installs nothing twice
    out["after_second_start"] = pynetdicom_state()
    asyncio.run(service.stop())
print(json.dumps(out))
'''


def _run(tmp_path: Path, version: str = "") -> dict:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "var"), str(free_port()), version],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.splitlines()[-1]))


UNTOUCHED = {
    "chunked": False, "request_identifiers_logged": True, "temp_file_class": "tempfile",
    "decode_msg": "pynetdicom.dimse_messages", "send_msg": "pynetdicom.dimse", "identifier_encoder": True,
    "uid_deepcopy": False, "dul_log_filters": 0,
}


def test_importing_the_dicom_service_leaves_pynetdicom_as_it_is_and_start_installs_the_patches(tmp_path: Path) -> None:
    out = _run(tmp_path)
    after_import = out["after_import"]
    assert {key: after_import[key] for key in UNTOUCHED} == UNTOUCHED
    after_start = out["after_start"]
    assert after_start["chunked"] is True
    assert after_start["request_identifiers_logged"] is False
    assert after_start["temp_file_class"] == "edge.dicom.receive_file"
    assert after_start["decode_msg"] == "edge.dicom.assembly"
    assert after_start["send_msg"] == "edge.dicom.find_responses"
    assert after_start["identifier_encoder"] is False
    assert after_start["uid_deepcopy"] is True
    assert after_start["dul_log_filters"] == 3  # two of peer_log's own, and the per-connection budget
    assert out["after_second_start"]["dul_log_filters"] == 3


def test_the_process_temp_folder_stays_and_a_c_store_temp_file_goes_to_the_data_disk(tmp_path: Path) -> None:
    """``edge run`` shares the process with the kiosk and sync: their temp files stay where Python puts them."""
    out = _run(tmp_path)
    assert out["after_start"]["gettempdir"] == out["after_import"]["gettempdir"] == tempfile.gettempdir()
    assert out["after_start"]["cstore_temp_folder"] == out["spool_tmp"]
    assert out["after_import"]["cstore_temp_folder"] != out["spool_tmp"]


@pytest.mark.parametrize("version", ["3.1.0", "2.1.1"])
def test_an_unknown_pynetdicom_version_refuses_to_start_naming_it(tmp_path: Path, version: str) -> None:
    out = _run(tmp_path, version)
    assert "after_start" not in out
    assert f"pynetdicom {version} is installed" in out["refused"]
    assert "3.0.4" in out["refused"]  # what to install instead
