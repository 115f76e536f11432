"""The node started on a disk that something else filled to the last byte.

It cannot run without its database, so it must not pretend to; what matters is that it
stops with one line a field engineer can act on (and systemd restarts it once space is
freed), not a Python traceback, and that what it already kept is untouched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.dicom_factory import make_dx
from tests.edge.helpers import spool_files, storescu
from tests.small_disk import fill, mounted_tmpfs


def test_node_on_a_full_disk_stops_with_a_clear_message_and_starts_once_there_is_room(
    node_factory: Any, tmp_path: Path
) -> None:
    with mounted_tmpfs(tmp_path / "small" / "var", 16) as disk:
        node = node_factory(("run",), subdir="small", sync={"enabled": False}).start()
        make_dx(tmp_path / "kept.dcm", rows=128, cols=128)
        assert "Received Store Response (Success)" in storescu(node, tmp_path / "kept.dcm").stderr
        assert node.stop() == 0
        filler = fill(disk)

        result = subprocess.run([sys.executable, "-m", "edge", "--config", str(node.config), "run"],
                                capture_output=True, text=True, timeout=60, cwd=node.tmp)
        said = result.stdout + result.stderr
        assert result.returncode == 1, said[-1500:]
        assert "Traceback" not in said
        assert "cannot" in said and "MB free on the data disk" in said, said[-1500:]

        filler.unlink()  # the field engineer frees space; systemd's next restart comes up
        node.start()
        assert len(spool_files(node)) == 1
        assert [s["instances"] for s in node.studies()] == [1]
