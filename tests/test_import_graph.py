"""The product's import graph: no cycles, and the built-in tiny models kept out of it.

Read from the source with ``ast`` (nothing is imported): every ``import`` statement of the
product's packages, at module level and inside functions and classes alike (a function-level
import is a cycle that merely waits for its first call), except those under
``if TYPE_CHECKING:``, which never run. An edge goes to the module an import names: ``from
a.b import c`` to ``a.b.c`` when that is a module, else to ``a.b``. A package's
``__init__`` running on the way to a submodule is not an edge, or every package whose
``__init__`` gathers its submodules would be a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("serve_app", "deployments", "builtin_models")
# The built-in tiny models (their builders, VAE fitting and trainers) are no part of the
# product: production code reaches them only through the resolver of ``builtin:`` names,
# ``builtin_models.ensure_builtin_model``, called from this one module.
BUILTIN = "builtin_models"
RESOLVER_CALL_SITES = {"deployments.weights"}


def module_files(root: Path = ROOT, packages: tuple[str, ...] = PRODUCT) -> dict[str, Path]:
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import node of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest module of the product that ``name`` (dotted) names or lies in."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: from the module's own package upwards
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                named = [f"{module}.{alias.name}" for alias in node.names]
            for each in named:
                target = _target(each, modules)
                if target is not None and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
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
    return sorted(found)


def _a_cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle inside ``component``, for the failure message."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & members)
        for candidate in nxt:
            if candidate == start:
                return [*path, start]
        unvisited = [c for c in nxt if c not in seen]
        if not unvisited:
            # Fall back to closing at the first repeated module.
            repeat = next(c for c in nxt if c in seen)
            return [*path[path.index(repeat) :], repeat]
        path.append(unvisited[0])
        seen.add(unvisited[0])


def test_the_graph_sees_module_and_function_level_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from pkg.a import A\n")
    (tmp_path / "pkg" / "a.py").write_text("from typing import TYPE_CHECKING\nfrom . import b\nA = 1\n")
    (tmp_path / "pkg" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\ndef f():\n    import pkg.c.d\n"
    )
    (tmp_path / "pkg" / "c").mkdir()
    (tmp_path / "pkg" / "c" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "c" / "d.py").write_text("class D:\n    def g(self):\n        from ..a import A\n")
    graph = import_graph(module_files(tmp_path, ("pkg",)))
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.c.d"},  # the function-level import; not the TYPE_CHECKING one
        "pkg.c": set(),
        "pkg.c.d": {"pkg.a"},  # relative, inside a method
    }
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c.d"]]


def test_no_import_cycles_among_the_products_modules():
    graph = import_graph(module_files())
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(_a_cycle_through(c, graph)) for c in found)


def test_production_code_reaches_the_builtin_models_only_through_the_resolver():
    modules = module_files()
    assert BUILTIN in modules, "the built-in tiny models live in a package of their own"
    graph = import_graph(modules)
    importers = {
        name
        for name, targets in graph.items()
        if not (name == BUILTIN or name.startswith(BUILTIN + "."))
        and any(t == BUILTIN or t.startswith(BUILTIN + ".") for t in targets)
    }
    assert importers <= RESOLVER_CALL_SITES, f"production modules importing {BUILTIN}: {sorted(importers)}"
    for name in RESOLVER_CALL_SITES:
        reached = {t for t in graph[name] if t == BUILTIN or t.startswith(BUILTIN + ".")}
        assert reached == {BUILTIN}, f"{name} imports {sorted(reached)}, not just the resolver's package"


def test_the_tiny_model_code_has_left_the_product():
    """No builder, VAE fitting or trainer is left in a production module."""
    leftovers = []
    for name, path in module_files().items():
        if name == BUILTIN or name.startswith(BUILTIN + "."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and (
                node.name.startswith("build_tiny") or node.name in ("tiny_components", "fit_vae", "structured_init")
            ):
                leftovers.append(f"{name}.{node.name}")
    assert not leftovers, leftovers
