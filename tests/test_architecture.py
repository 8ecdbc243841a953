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


# The layers of kdray, lowest first: a module imports only from its own layer or the layers below it (DESIGN.md:
# dependencies point down). The registries (kdray.registry) find the components above them by package name, as
# a plug-in system does, so the config can name a method, an exchange or an engine without importing it.
LAYERS = (
    (
        "errors",
        "version",
        "safe_yaml",
        "registry",
        "seeds",
        "topology",
        "losses",
        "models",
        "metrics",
        "checkpoint",
    ),
    ("config",),
    ("data", "tracking", "optim", "schedules"),
    ("methods", "exchange"),
    ("population",),
    ("step", "evaluation", "replicas", "plots", "exporter"),
    ("loop",),
    ("engines",),
    ("run",),
    ("generations", "stages"),
    (
        "api",
        "search",
        "compare",
        "cluster",
    ),  # cluster: `kdray cluster check` runs the engine's placement planner
    ("cli", "__main__", "kdray"),
)


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _kdray_graph() -> dict[str, set[str]]:
    """Module -> the kdray modules it imports (a package import counts as its __init__)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        named = set(imports_of(path))
        for node in ast.walk(
            ast.parse(path.read_text())
        ):  # ``from kdray.engines import ray_private``: a module
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                named |= {
                    f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules
                }
                if (
                    any(f"{node.module}.{a.name}" in modules for a in node.names)
                    and node.module not in modules
                ):
                    named.discard(node.module)  # a namespace package (no __init__): only its modules count
        deps = {resolve(m) for m in named if m == "kdray" or m.startswith("kdray.")}
        graph[name] = {d for d in deps if d and d != name}
    return graph


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else module
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it")


def test_no_module_imports_from_a_higher_layer():
    graph = _kdray_graph()
    bad = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if _layer(d) > _layer(m)
    ]
    assert not bad, bad


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    """No two modules import each other, directly or through others (lazy and type-only imports count)."""
    assert _circles(_kdray_graph()) == []


def test_the_circle_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
