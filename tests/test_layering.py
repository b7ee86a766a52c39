"""The floors and the import graph, read from the source (no import runs): ``shards`` imports nothing of
``lenstrain`` or ``launcher``, ``lenstrain`` nothing of ``launcher``, and no module imports itself back
through others, counting imports under ``TYPE_CHECKING`` and inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("shards", "lenstrain", "launcher")  # each may import only the ones before it


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in FLOORS:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {resolve(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found |= {resolve(f"{base}.{alias.name}") for alias in node.names}
    return found - {None, name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_even_under_type_checking():
    assert cycles(import_graph()) == []


def test_each_floor_imports_only_the_floors_below():
    graph = import_graph()
    assert len(graph) > 50  # every package was read
    upward = [f"{name} imports {dep}" for name, deps in graph.items() for dep in deps
              if FLOORS.index(dep.split(".")[0]) > FLOORS.index(name.split(".")[0])]
    assert upward == []


def test_lenstrain_is_grouped_by_concern():
    top = sorted(p.name for p in (ROOT / "lenstrain").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file())
    assert len(top) <= 12, top
    assert {"config", "data", "models", "optimization", "run", "checkpointing", "parallel", "evaluation"} <= set(top)


def test_the_old_flat_module_paths_import_as_the_modules_themselves():
    import importlib

    import lenstrain

    for old, home in lenstrain.MOVED.items():
        assert not (ROOT / (old.replace(".", "/") + ".py")).exists(), old
        module = importlib.import_module(old)
        assert module is importlib.import_module(home), old
        assert module.__spec__.name == home  # the alias leaves the module's own spec alone
    from lenstrain.config import load_config
    from lenstrain.config.schema import load_config as at_home
    from lenstrain.data import TrainStream
    from lenstrain.data.loader import TrainStream as loader_home

    assert load_config is at_home and TrainStream is loader_home
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        lenstrain.config.nothing_here  # noqa: B018
