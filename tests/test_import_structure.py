"""The floors of the code, checked from the source: no import cycle among the project's
modules, and no import that runs back up (features and storage never import modeling or
flows; modeling never imports flows; the training driver never imports the tracker: it logs
through ``modeling.training.run_logger.RunLogger``, which ``modeling.tracking`` implements).

Imports are read with ``ast`` from every file, including those inside functions and under
``TYPE_CHECKING``: a lazy import is still a dependency, it only hides a cycle until the
function runs. An import of ``a.b.c`` is an edge to ``a.b.c`` alone, not to its parent
packages (as import-linter counts them): a package's ``__init__`` importing its own
modules is not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("storage", "features", "modeling", "flows")
# package -> the packages it must never import (the floors above it)
FORBIDDEN = {"storage": {"modeling", "flows"}, "features": {"modeling", "flows"}, "modeling": {"flows"}}
# sub-package -> the sub-packages it must never import (inside one floor)
FORBIDDEN_WITHIN = {"modeling.training": {"modeling.tracking"}}


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..a import b
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import func` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
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
                    found.append(sorted(component))
    return found


def test_the_graph_sees_the_imports_it_should() -> None:
    graph = import_graph()
    assert {"modeling.tracking.runs", "features.recipes"} <= graph["modeling.tracking.registry"] | graph["modeling.tracking.runs"]
    assert "flows.preprocess" in graph["flows.cli"]  # an import inside a function counts
    assert "modeling.data.splits" in graph["modeling.training.experiment"]  # `from modeling import splits as sp`
    assert "modeling.training.run_logger" in graph["modeling.tracking.run_logger"]  # the tracker implements the driver's interface
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    graph = import_graph()
    found = cycles(graph)
    detail = [" <-> ".join(c) + ": " + "; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


def test_no_import_runs_back_up() -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if target.split(".")[0] in FORBIDDEN.get(module.split(".")[0], set())
    ]
    assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(upward)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_training_never_imports_tracking() -> None:
    """The driver logs through its RunLogger interface; MLflow stays behind ``modeling.tracking``."""
    crossing = [
        f"{module} imports {target}"
        for module, targets in sorted(import_graph().items())
        for package, banned in FORBIDDEN_WITHIN.items()
        if _within(module, package)
        for target in sorted(targets)
        if any(_within(target, b) for b in banned)
    ]
    assert not crossing, "imports across a forbidden boundary:\n" + "\n".join(crossing)
