"""edge.toml as the field engineer meets it: clear errors naming the key, a documented file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edge.node.config import EdgeConfig
from tests.conftest import REPO, edge_cli, write_config

SHIPPED = REPO / "edge.toml"


def test_out_of_range_port_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "edge.toml", tmp_path / "var", dicom={"port": 70000})
    result = edge_cli(config, "status", check=False)
    assert result.returncode == 2
    assert "[dicom] port" in result.stderr
    assert "70000" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_misspelt_key_exits_2_naming_it(tmp_path: Path) -> None:
    config = write_config(tmp_path / "edge.toml", tmp_path / "var", dicom={"ae_tilte": "EDGE"})
    result = edge_cli(config, "status", check=False)
    assert result.returncode == 2
    assert "[dicom] ae_tilte" in result.stderr
    assert "unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    result = edge_cli(tmp_path / "nowhere.toml", "status", check=False)
    assert result.returncode == 2
    assert "nowhere.toml: config file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_not_toml_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text("[dicom\nport = 11112\n")
    result = edge_cli(config, "status", check=False)
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr


def test_edge_config_environment_variable_is_honoured(tmp_path: Path) -> None:
    config = write_config(tmp_path / "site.toml", tmp_path / "var", node={"id": "clinic-env-7"})
    result = subprocess.run(
        [sys.executable, "-m", "edge", "status", "--json"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "EDGE_CONFIG": str(config)},
    )
    assert result.returncode == 0, result.stderr
    assert '"id": "clinic-env-7"' in result.stdout
    # --config still wins over the environment.
    other = write_config(tmp_path / "other.toml", tmp_path / "var2", node={"id": "clinic-flag-8"})
    result = subprocess.run(
        [sys.executable, "-m", "edge", "--config", str(other), "status", "--json"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "EDGE_CONFIG": str(config)},
    )
    assert '"id": "clinic-flag-8"' in result.stdout


def _sections() -> dict[str, type[BaseModel]]:
    sections = {}
    for name, field in EdgeConfig.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            sections[name] = field.annotation
    return sections


def _key_lines(text: str) -> dict[tuple[str, str], str]:
    """(section, key) -> the line the key is set on in the shipped file."""
    lines: dict[tuple[str, str], str] = {}
    section = ""
    for line in text.splitlines():
        header = re.match(r"^\s*\[([A-Za-z0-9_.-]+)\]", line)
        if header:
            section = header.group(1)
            continue
        key = re.match(r"^\s*([A-Za-z0-9_]+)\s*=", line)
        if key:
            lines[(section, key.group(1))] = line
    return lines


def test_shipped_edge_toml_documents_every_key_with_its_default() -> None:
    text = SHIPPED.read_text()
    shipped = tomllib.loads(text)
    lines = _key_lines(text)
    missing, uncommented, different = [], [], []
    for section, model in _sections().items():
        defaults: dict[str, Any] = model().model_dump(mode="json")
        for key in model.model_fields:
            where = f"[{section}] {key}"
            if key not in shipped.get(section, {}):
                missing.append(where)
                continue
            if "#" not in lines[(section, key)].split("=", 1)[1]:
                uncommented.append(where)
            if shipped[section][key] != defaults[key]:
                different.append(f"{where} = {shipped[section][key]!r}, model default {defaults[key]!r}")
    assert not missing, f"keys missing from the shipped edge.toml: {', '.join(missing)}"
    assert not uncommented, f"keys without a # comment: {', '.join(uncommented)}"
    assert not different, "shipped values differ from the defaults: " + "; ".join(different)


def test_shipped_edge_toml_loads_without_error() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from edge.node.config import load_config; import sys; load_config(sys.argv[1])", str(SHIPPED)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
