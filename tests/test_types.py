"""mypy is part of the suite: zero errors on the four packages, under the README's test command (issue 13).

``disallow_untyped_defs`` was on but nothing ran the checker, so the count drifted to 100
(87 of them peewee 4's typed query rows). The versions it checks against are pinned in
pyproject.toml (peewee to the 4.5 minor: its stubs ship in the wheel; mypy itself exactly).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge", "sync", "kiosk", "firmware_bridge")


def test_the_packages_type_check_with_zero_errors() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *PACKAGES], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"mypy {' '.join(PACKAGES)}:\n{proc.stdout}{proc.stderr}"
    assert "Success: no issues found" in proc.stdout


def test_the_check_is_not_switched_off_anywhere() -> None:
    """No blanket escapes: untyped defs stay errors, no module is skipped, every ignore names its code."""
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert mypy.get("disallow_untyped_defs") is True
    assert "ignore_errors" not in mypy and "ignore_missing_imports" not in mypy
    for override in mypy.get("overrides", []):
        assert set(override) <= {"module", "ignore_missing_imports"}, override
    bare = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if re.search(r"#\s*type:\s*ignore(?!\[)", line) or re.match(r"\s*#\s*mypy:", line):
                    bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bare, "ignores without an error code:\n" + "\n".join(bare)
