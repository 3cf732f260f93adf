"""The one-way layout of design.md: arrows point down the table only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = {"radbridge", "dicom_io", "models", "serving", "review"}
ALLOWED = {
    "radbridge": set(),
    "dicom_io": {"radbridge"},
    "models": {"radbridge"},
    "serving": {"radbridge", "dicom_io", "models"},
    "review": {"radbridge", "dicom_io"},
}
# The CLI is the composition root: it imports the other packages lazily inside commands.
COMPOSITION_ROOTS = {REPO / "radbridge" / "cli.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down_the_table(package: str) -> None:
    bad = []
    files = list((REPO / package).rglob("*.py"))
    assert files, f"{package}/ has no modules: the check would pass vacuously"
    for path in files:
        if path in COMPOSITION_ROOTS:
            continue
        for imported in _imports(path) - {package} - ALLOWED[package]:
            bad.append(f"{path.relative_to(REPO)} imports {imported}")
    assert bad == []


def test_composition_root_imports_lazily() -> None:
    """Top-level imports of the CLI stay inside radbridge, so `import radbridge` stays light."""
    tree = ast.parse((REPO / "radbridge" / "cli.py").read_text(encoding="utf-8"))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
    assert top & OURS <= {"radbridge"}
