"""The import-layer contract of docs/ARCHITECTURE.md: every import in easysft/ points down the layer order.

A module may import from its own unit (its top-level module or package) and from units of LOWER layers only;
lazy imports inside functions count too (they are still dependencies, only deferred). The order lives in
``LAYERS`` below and in docs/ARCHITECTURE.md; change both together.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "easysft"

# Bottom first. Units on one line are one layer: they may not import each other.
LAYERS = [
    ("errors", "files", "dtypes", "testing_hooks", "quiet"),
    ("config",),
    ("distributed",),
    ("data",),
    ("models", "metrics", "scoring", "chunked_ce"),
    ("loss", "kernels"),
    ("checkpoint",),
    ("engines",),
    ("evaluation", "generate", "probe"),
    ("training",),
    ("inference", "chat", "demo", "export"),
    ("dashboard",),
    ("commands",),
    ("cli",),
    ("__main__", "__init__"),
]
LAYER_OF = {unit: index for index, units in enumerate(LAYERS) for unit in units}


def unit_of_file(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported_units(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, unit) for every ``easysft.X...`` import (``from easysft import X`` names X)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "easysft":
                continue
            if len(parts) > 1:
                found.append((node.lineno, parts[1]))
            else:
                found += [(node.lineno, alias.name) for alias in node.names if alias.name != "__version__"]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "easysft" and len(parts) > 1:
                    found.append((node.lineno, parts[1]))
    return found


def test_every_unit_has_a_layer():
    units = {unit_of_file(p) for p in PACKAGE.rglob("*.py")}
    assert units - set(LAYER_OF) == set(), "add the new module or package to LAYERS and docs/ARCHITECTURE.md"


def test_imports_point_down_the_layers():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of_file(path)
        for line, target in imported_units(ast.parse(path.read_text(encoding="utf-8"))):
            if target == unit or target == "__version__":
                continue
            if target not in LAYER_OF:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports unknown unit {target!r}")
            elif LAYER_OF[target] >= LAYER_OF[unit]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {unit} (layer {LAYER_OF[unit]}) "
                                  f"imports {target} (layer {LAYER_OF[target]})")
    assert violations == [], "\n".join(violations)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The contract can fail: an engine importing the training loop is reported."""
    tree = ast.parse("def f():\n    from easysft.training.loop import train\n")
    assert imported_units(tree) == [(2, "training")]
    assert LAYER_OF["training"] > LAYER_OF["engines"]
