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


def _names_from(path: Path, module: str) -> set[str]:
    """The names ``path`` imports from ``module`` (``from module import a, b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == module
        for alias in node.names
    }


def _row_classes(tables: frozenset[str]) -> set[str]:
    from radbridge.db.tables import Base

    return {m.class_.__name__ for m in Base.registry.mappers if m.class_.__tablename__ in tables}


# Center code that sits in dicom_io/ because review/ (which may not import serving/) uses it.
CENTER_MODULES_IN_DICOM_IO = {REPO / "dicom_io" / "result_store.py"}


def test_each_node_touches_only_its_own_tables() -> None:
    """Each node's database holds only its tables (radbridge/db/tables.py: EDGE_ONLY,
    CENTER_ONLY; the migrations branch per node): the center's code names no edge table's
    row, the edge's no center table's."""
    from radbridge.db.tables import CENTER_ONLY, EDGE_ONLY

    edge_rows, center_rows = _row_classes(EDGE_ONLY), _row_classes(CENTER_ONLY)
    assert edge_rows and center_rows
    center = [*(REPO / "serving").rglob("*.py"), *(REPO / "review").rglob("*.py")]
    center += sorted(CENTER_MODULES_IN_DICOM_IO)
    edge = set((REPO / "dicom_io").rglob("*.py")) - CENTER_MODULES_IN_DICOM_IO
    bad = [
        f"{path.relative_to(REPO)} uses {name}"
        for paths, forbidden in ((center, edge_rows), (sorted(edge), center_rows))
        for path in paths
        for name in sorted(_names_from(path, "radbridge.db.tables") & forbidden)
    ]
    assert bad == []


def test_the_api_replica_leaves_volume_work_to_the_preprocessor() -> None:
    """A CT series is decoded, resampled and segmented in the Preprocessor deployment
    (serving/preprocess.py), not in the 0.1-CPU Api replica's routes or job engine."""
    volume_work = {"segment_series", "read_series", "detect_nodules"}
    for name in ("ingress.py", "pipeline.py", "inference.py"):
        path = REPO / "serving" / name
        used = set()
        for module in ("serving.segmentation", "dicom_io.volume", "models.nodules"):
            used |= _names_from(path, module)
        assert not used & volume_work, f"serving/{name} imports {used & volume_work}"
    assert "segment_series" in _names_from(
        REPO / "serving" / "preprocess.py", "serving.segmentation"
    )
