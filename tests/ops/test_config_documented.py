"""Every edge.toml key of every section is in the shipped edge.toml, with its default and a comment."""

from __future__ import annotations

import re
import tomllib

from pydantic import BaseModel

from edge.node.config import EdgeConfig
from tests.conftest import REPO


def test_every_config_key_is_shipped_with_its_default_and_a_comment() -> None:
    text = (REPO / "edge.toml").read_text()
    shipped = tomllib.loads(text)
    defaults = EdgeConfig().model_dump()
    problems: list[str] = []
    for section, field in EdgeConfig.model_fields.items():
        if section == "base_dir":
            continue
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        body = re.search(rf"^\[{section}\]\n(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
        if body is None:
            problems.append(f"[{section}] missing")
            continue
        for key in model.model_fields:
            line = re.search(rf"^{key} = .*$", body.group(1), re.MULTILINE)
            if line is None:
                problems.append(f"[{section}] {key} missing")
            elif "#" not in line.group(0):
                problems.append(f"[{section}] {key} has no comment")
            elif shipped[section][key] != defaults[section][key]:
                problems.append(f"[{section}] {key} = {shipped[section][key]!r}, default {defaults[section][key]!r}")
    assert problems == []
