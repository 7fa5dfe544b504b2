"""The package's import graph: layers point one way, no cycles, no borrowed private names.

Every ``import`` counts, also those inside functions and under ``TYPE_CHECKING``: a lazy import
is still an arrow, and a cycle hidden in a function is a cycle. A type named both ways is a
cycle too: two modules that each need the other's type are one idea split in two, or a value
type that also builds things (timm keeps ``PretrainedCfg`` in a module that imports nothing of
the package, and builds from it elsewhere).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# Low to high. A module imports its own subpackage and lower layers only; subpackages that
# share a layer stay independent of each other.
LAYERS = (
    ("core",),
    ("data",),
    ("models", "metrics"),
    ("store",),
    ("report",),
    ("extract",),
    ("heads",),
    ("auditing", "advice"),
    ("finetuning",),
    ("deploy",),
    ("distillation", "monitoring"),
    ("cli", "bench"),
    ("__main__",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for each of ``name``'s imports of this package."""
    path = MODULES[name]
    return imports_in(path.read_text(), name, path.name == "__init__.py", MODULES)


def imports_in(source: str, name: str, is_package: bool, modules) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for each import of this package in ``source``, the
    text of module ``name`` (``is_package``: an ``__init__.py``); ``modules``: the module
    names there are, which tell ``from a import b`` of a module from that of a name."""
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(source, name)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, None) if submodule in modules else (base, alias.name))
    return [(m, n) for m, n in found if m == "pipeline" or m.startswith("pipeline.")]


def graph() -> dict[str, list[str]]:
    return {name: sorted({m for m, _ in imports_of(name) if m != name}) for name in MODULES}


GRAPH = graph()


def subpackage(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, list[str]]) -> list[str]:
    wrong = []
    for name, targets in graph.items():
        here = subpackage(name)
        for target in targets:
            there = subpackage(target)
            if here is None or there is None or here == there:
                continue
            if here not in RANK or there not in RANK or RANK[there] >= RANK[here]:
                wrong.append(f"{name} -> {target}")
    return wrong


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def borrowed_private_names() -> list[str]:
    """``from pipeline.x import _y`` across modules, or a private module used from outside
    its own subpackage."""
    wrong = []
    for name in MODULES:
        for target, imported in imports_of(name):
            if target == name:
                continue
            if imported is not None and imported.startswith("_") and target != "pipeline":
                wrong.append(f"{name} imports {target}.{imported}")
            private_module = any(p.startswith("_") and p != "__init__"
                                 for p in target.split(".")[1:])
            if private_module and target.rpartition(".")[0] != name.rpartition(".")[0]:
                wrong.append(f"{name} imports {target}")
    return wrong


def test_every_subpackage_has_a_layer():
    unplaced = {subpackage(n) for n in MODULES if subpackage(n)} - set(RANK)
    assert not unplaced, f"give these a layer in LAYERS: {sorted(unplaced)}"


def test_imports_point_down_the_layers():
    assert upward_imports(GRAPH) == []


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_no_module_borrows_another_ones_private_names():
    assert borrowed_private_names() == []


@pytest.mark.parametrize("graph, expected", [
    ({"pipeline.core.a": ["pipeline.store.b"], "pipeline.store.b": []},
     ["pipeline.core.a -> pipeline.store.b"]),
    ({"pipeline.models.a": ["pipeline.metrics.b"], "pipeline.metrics.b": []},
     ["pipeline.models.a -> pipeline.metrics.b"]),
    ({"pipeline.store.a": ["pipeline.core.b"], "pipeline.core.b": []}, []),
])
def test_the_layer_check_catches_an_upward_arrow(graph, expected):
    assert upward_imports(graph) == expected


def test_the_cycle_check_catches_a_cycle():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_cycle_check_counts_an_import_for_type_checking_only():
    sources = {
        "pipeline.x.a": "from pipeline.x.b import B\n",
        "pipeline.x.b": ("from typing import TYPE_CHECKING\n"
                         "if TYPE_CHECKING:\n    from pipeline.x.a import A\n"),
        "pipeline.x.c": "def f():\n    from pipeline.x import a\n",
    }
    graph = {name: sorted({m for m, _ in imports_in(text, name, False, sources)})
             for name, text in sources.items()}
    assert graph == {"pipeline.x.a": ["pipeline.x.b"], "pipeline.x.b": ["pipeline.x.a"],
                     "pipeline.x.c": ["pipeline.x.a"]}
    assert cycles(graph) == [["pipeline.x.a", "pipeline.x.b"]]
