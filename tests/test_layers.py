"""Imports point one way: a layer imports from the layers below it and its own, never
from one above (README.md, Layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import tidal

LAYERS = [  # lowest first
    {"errors", "config", "mixing", "gate", "processes"},
    {"data", "embedding", "optim", "models"},
    {"runtime", "passmode"},
    {"compile"},  # compiled forms of the dense network: what serving runs
    {"serving"},
    {"bench", "demo"},
    {"cli"},
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}
ROOT = Path(tidal.__file__).parent


def _imported(file: Path, root: Path = ROOT) -> list[str]:
    """The tidal subpackages and modules a module imports (`tidal.x` -> "x"), relative
    imports resolved; names the package root gives that are not modules (its
    `__version__`) are left out."""
    package = ["tidal", *file.relative_to(root).parent.parts]
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = [*base, *(node.module or "").split(".")] if node.module else base
            if module == ["tidal"]:  # from tidal import demo
                found += [alias.name for alias in node.names if alias.name in LEVEL]
            elif module[:1] == ["tidal"]:
                found.append(module[1])
        elif isinstance(node, ast.Import):
            found += [a.name.split(".")[1] for a in node.names if a.name.startswith("tidal.")]
    return found


def test_every_module_belongs_to_a_layer():
    tops = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert tops - {"__init__"} <= set(LEVEL), "a new top-level module or subpackage needs its place in LAYERS"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for file in sorted(ROOT.rglob("*.py")):
        top = file.relative_to(ROOT).parts[0].removesuffix(".py")
        if top == "__init__":  # the public API gathers every layer
            continue
        upward += [f"{file.relative_to(ROOT)} imports tidal.{name}" for name in _imported(file) if LEVEL[name] > LEVEL[top]]
    assert upward == []


def test_relative_imports_resolve_to_their_layer(tmp_path):
    module = tmp_path / "embedding" / "table.py"
    module.parent.mkdir()
    module.write_text("from ..serving import bundle\nfrom . import index\nfrom tidal import __version__\n")
    assert _imported(module, tmp_path) == ["serving", "embedding"]
