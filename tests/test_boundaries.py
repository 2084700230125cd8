"""The house's boundaries, read from the source (AST, nothing imported): dependencies point one way.

cli/ is imported by nothing; data_pipelines never imports jedi_train; jedi_common imports neither package;
models/ knows nothing of Lightning, Hydra, WebDataset or the training / pipeline rooms; no module outside the
family table and the families' own rooms compares family names."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path) -> list[str]:
    """Every module a file imports (absolute; relative ones resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found += [base] + [f"{base}.{a.name}" for a in node.names]
    return found


def files(*roots: str) -> list[Path]:
    return sorted(p for r in roots for p in (REPO / r).rglob("*.py"))


@pytest.mark.parametrize("room, forbidden", [
    ("data_pipelines", ("jedi_train",)),
    ("jedi_common", ("jedi_train", "data_pipelines")),
    ("jedi_train/models", ("lightning", "hydra", "webdataset", "jedi_train.training", "jedi_train.pipelines",
                           "jedi_train.export", "jedi_train.sampling", "jedi_train.cli")),
    ("jedi_train/pipelines", ("lightning", "hydra", "jedi_train.training", "jedi_train.export", "jedi_train.cli")),
])
def test_dependencies_point_one_way(room, forbidden):
    bad = [(str(p.relative_to(REPO)), m) for p in files(room) for m in imports(p)
           if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not bad, bad


def test_nothing_imports_cli():
    bad = [(str(p.relative_to(REPO)), m) for p in files("jedi_train", "data_pipelines", "jedi_common")
           if "cli" not in p.relative_to(REPO).parts for m in imports(p)
           if m == "jedi_train.cli" or m.startswith("jedi_train.cli.")]
    assert not bad, bad


def test_family_names_are_compared_only_in_the_families_rooms():
    """`family == "flux"` and the like belong in the table (models/families.py) or a family's own module."""
    from jedi_train.models import families

    names = set(families.FAMILIES)
    allowed = {"models/families.py", "models/text.py", "models/tiny.py"}  # the table; text layouts; recipes
    bad = []
    for p in files("jedi_train", "data_pipelines"):
        rel = str(p.relative_to(REPO / "jedi_train")) if p.is_relative_to(REPO / "jedi_train") else str(p)
        if rel in allowed or "joint_" in p.name or p.name.startswith("pipeline_jedi_"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                bad += [(rel, node.lineno, c) for c in consts if c in names]
    assert not bad, bad
