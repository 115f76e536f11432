"""The house has a ground, parts and a roof, and every module stands on its own (issue 13).

Before, ``python -c "import sync.config"`` failed in a fresh interpreter (an import loop
through ``edge.config``) and worked only when something had imported ``edge.config``
first. These tests read every module's imports and import each one alone.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge", "sync", "kiosk", "firmware_bridge")

# The roof: composition. It may import everything; nothing below imports it at run time.
ROOF = ("edge.node", "edge.console", "edge.ops", "edge.__main__")
# The parts, in the order they may lean on each other (a part imports only earlier ones).
PARTS = ("edge.orders", "edge.dicom", "sync", "kiosk", "firmware_bridge")
# Everything else in edge/ is the ground: the store, config primitives, the service
# protocol, secret hashing, check digits, durable files, the web helpers.


def all_modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def within(module: str, prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if module == p or module.startswith(p + ".")), None)


def layer_of(module: str) -> tuple[int, int]:
    """(layer, rank within the layer): ground (0, 0), parts (1, order), roof (2, 0)."""
    if within(module, ROOF):
        return (2, 0)
    part = within(module, PARTS)
    if part:
        return (1, PARTS.index(part))
    return (0, 0)


def runtime_imports(module: str) -> set[str]:
    """First-party modules imported when ``module`` runs (``if TYPE_CHECKING:`` blocks left out)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    is_package = not path.exists()
    if is_package:
        path = ROOT / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)  # `from edge import sdnotify`
    known = set(all_modules())
    return {name for name in found if name in known and name != module}


def test_every_layer_imports_only_what_lies_below_it() -> None:
    wrong = []
    for module in all_modules():
        mine = layer_of(module)
        for imported in runtime_imports(module):
            theirs = layer_of(imported)
            same_part = mine[0] == 1 and within(module, PARTS) == within(imported, PARTS)
            if theirs > mine and not same_part:
                wrong.append(f"{module} imports {imported}")
    assert wrong == [], "imports that reach up a layer (or to a later part):\n" + "\n".join(wrong)


def test_the_layer_rule_would_catch_a_part_importing_the_roof() -> None:
    assert layer_of("sync.worker") < layer_of("edge.node.config")
    assert layer_of("edge.store.db") < layer_of("sync.worker")
    assert layer_of("edge.orders.tables") < layer_of("edge.dicom.worklist") < layer_of("kiosk.tickets")
    assert "edge.node.config" not in runtime_imports("sync.cloud")  # named only under TYPE_CHECKING
    assert "edge.store.db" in runtime_imports("sync.outbox")


# Each module is imported in a child forked from an interpreter that has loaded the
# third-party libraries and none of ours: alone as far as our modules go (what this test is
# about: an import loop or an order dependency among them), without paying pydicom's and
# aiohttp's import ~180 times over (a fresh interpreter each was 49 s of two cores).
_FORK_EACH = """
import importlib, os, sys, traceback
for name in ("numpy", "pydicom", "pynetdicom", "aiohttp", "aiohttp_jinja2", "pydantic", "peewee", "prometheus_client",
             "reportlab.pdfgen.canvas", "cryptography", "zeroconf", "serial", "segno", "tenacity", "jinja2", "cobs"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] in ("edge", "sync", "kiosk", "firmware_bridge")], "ours loaded early"
for module in sys.argv[1:]:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
            print(module, 0, "", sep="\t", flush=True)
            os._exit(0)
        except BaseException as exc:
            last = traceback.format_exception_only(exc)[-1].strip()
            print(module, 1, last, sep="\t", flush=True)
            os._exit(1)
    os.waitpid(pid, 0)
"""


@pytest.mark.slow
def test_every_module_imports_on_its_own_in_a_fresh_interpreter() -> None:
    modules = [m for m in all_modules() if m != "edge.__main__"]  # __main__ runs the CLI
    done = subprocess.run([sys.executable, "-c", _FORK_EACH, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = [line.split("\t") for line in done.stdout.splitlines() if line.count("\t") == 2]
    assert sorted(module for module, _, _ in results) == sorted(modules), done.stderr[-3000:]
    failed = [f"{module}: {error}" for module, code, error in results if code != "0"]
    assert len(results) > 100
    assert failed == [], "\n".join(failed)
