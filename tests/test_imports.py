"""The package's import graph: no cycles, even through imports inside functions, and Hydra only in the commands.

Every ``import`` of the package counts, wherever it is (module level, inside a function, under
``TYPE_CHECKING``): a function-level import that only dodges a cycle is a cycle. Read with ``ast``, nothing is
imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tropd_cli"
#: The command layer: the only modules that may import Hydra or OmegaConf.
COMMAND_LAYER = ("tropd_cli.cli", "tropd_cli.commands")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(tree: ast.Module, names: set[str]) -> set[str]:
    """Every module of ``names`` the tree imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in out if name in names}


def external(tree: ast.Module) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def graph() -> dict[str, set[str]]:
    trees = modules()
    names = set(trees)
    # A module's own package ``__init__`` runs first anyway: not an edge of the graph.
    return {
        name: imported(tree, names) - {name} - {p for p in names if name.startswith(p + ".")}
        for name, tree in trees.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_cycle_finder_finds_a_cycle_through_any_import():
    tree = ast.parse("def f():\n    from tropd_cli import b\n")
    assert imported(tree, {"tropd_cli.b"}) == {"tropd_cli.b"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles():
    assert cycles(graph()) == []


def test_only_the_command_layer_imports_hydra_and_omegaconf():
    importers = sorted(name for name, tree in modules().items() if external(tree) & {"hydra", "omegaconf"})
    assert importers, "the command layer imports Hydra"
    assert [name for name in importers if not name.startswith(COMMAND_LAYER)] == []
