"""The package's wings and what each may import (their ``__init__`` docstrings say the same).

A message's way through ``mirror/`` runs session -> decode -> store, with repair beside it and
ops under all; ``sim`` is the test and benchmark stand-in for flespi. A module that reaches into
a wing it may not (the session into the store, decoding into anything) fails here."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "mirror"
# wing -> the wings its modules may import (the package's top, ``mirror.__version__``, is free)
MAY_IMPORT = {
    "decode": set(),
    "ops": {"decode", "sim"},  # metric labels' enums; simulate's options class, lazily
    "session": {"ops"},
    "store": {"decode", "ops"},
    "repair": {"decode", "store", "session", "ops"},
    "sim": {"decode", "ops"},
}
WINGS = sorted(MAY_IMPORT)


def imported_wings(path: Path) -> set[str]:
    """The wings (or top-level modules) ``path`` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mirror" and len(parts) > 1 and parts[1] != "__version__":
                found.add(parts[1])
    return found


def test_the_package_is_wings_and_a_few_top_modules():
    wings = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert wings == set(WINGS)
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {"__init__", "cli", "pipeline", "snapshot", "workers"}
    for wing in WINGS:
        doc = ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text()))
        assert doc and "import" in doc, f"mirror/{wing}/__init__.py says nothing of its imports"


def test_each_wing_imports_only_what_it_may():
    breaches = []
    for wing in WINGS:
        for path in sorted((PACKAGE / wing).glob("*.py")):
            reached = imported_wings(path) - {wing} - MAY_IMPORT[wing]
            if reached:
                breaches.append(f"mirror/{wing}/{path.name} imports {sorted(reached)}")
    assert breaches == []


def test_the_product_never_imports_the_simulator_but_to_run_it():
    users = {
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*.py")
        if "sim" in imported_wings(path) and path.parent.name != "sim"
    }
    # cli.py runs `simulate`; options.py names its options class (imported when used)
    assert users == {"mirror/cli.py", "mirror/ops/options.py"}
