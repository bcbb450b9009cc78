"""Module boundaries, read from the source: no import cycles, `reduction/` is
pure array code, and no project import is hidden inside a function."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("hybridvlm", "reduction", "train", "eval", "configs")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(path: pathlib.Path, *, top_level_only: bool) -> set[str]:
    """Project modules `path` imports (`from a import b` counts as a.b when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {name for name in out if name in MODULES}


def _graph() -> dict[str, set[str]]:
    return {name: _imports(path, top_level_only=False) - {name} for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                    out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_cycle():
    # The check below is only as good as this finder.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_packages_have_no_import_cycles():
    assert len(MODULES) > 30, MODULES  # the walk found the source
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.split(".")[0] in ("hybridvlm", "reduction")))
def test_project_imports_are_at_module_level(name):
    # A function-level import of a project module is how a cycle gets hidden.
    path = MODULES[name]
    assert _imports(path, top_level_only=False) == _imports(path, top_level_only=True), path


def test_reduction_does_not_import_the_model():
    # The model calls reduction (pure array code), never the other way round.
    for name, path in MODULES.items():
        if name.split(".")[0] == "reduction":
            model_imports = {m for m in _imports(path, top_level_only=False) if m.split(".")[0] == "hybridvlm"}
            assert not model_imports, (path, model_imports)
