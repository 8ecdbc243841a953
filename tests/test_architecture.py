"""Dependencies point one way (DESIGN.md): methods know nothing of engines, exchanges, Ray or MLflow; exchanges know
nothing of the population, the loop, the engines, methods or models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdray"

FORBIDDEN = {
    "methods": ("kdray.engines", "kdray.exchange", "kdray.loop", "kdray.population", "kdray.step", "kdray.api",
                "kdray.tracking", "kdray.search", "ray", "mlflow"),
    "exchange": ("kdray.population", "kdray.loop", "kdray.step", "kdray.engines", "kdray.methods", "kdray.models",
                 "kdray.api", "kdray.data"),
}  # fmt: skip


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package):
    files = sorted((PACKAGE / package).glob("*.py"))
    assert files
    bad = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in files
        for name in sorted(imports_of(path))
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])
    ]
    assert not bad, bad


def test_the_check_itself_sees_lazy_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text(
        "def f():\n    import ray.train\n    from kdray.engines.local_engine import LocalEngine\n"
    )
    assert imports_of(sample) == {"ray.train", "kdray.engines.local_engine"}
