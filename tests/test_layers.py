"""The import graph, read from the source with ast (nothing is imported): no cycles among
trainkit's modules, and the data package reaching up to nothing above it."""
import ast
from pathlib import Path

import trainkit

ROOT = Path(trainkit.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the trainkit modules it imports (at any depth in its code: lazy imports count too)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
                for alias in node.names:      # `from . import x` names a module; `from .x import y` a name in x
                    edges.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_the_data_floor():
    graph = import_graph()
    data_cycles = [c for c in cycles(graph) if any(m.startswith("trainkit.data") or m in
                   ("trainkit.datasets", "trainkit.emnist", "trainkit.stream") for m in c)]
    assert data_cycles == []


def test_the_data_package_imports_nothing_above_it():
    allowed = {"trainkit.errors", "trainkit.registry"}
    graph = import_graph()
    for name, edges in graph.items():
        if name == "trainkit.data" or name.startswith("trainkit.data."):
            above = {e for e in edges if not (e.startswith("trainkit.data") or e in allowed)}
            assert not above, f"{name} imports {sorted(above)}"
