"""The import graph, read from the source with ast (nothing is imported): no cycles among
trainkit's modules, and no module importing a floor above its own (docs/architecture.md)."""
import ast
import re
from pathlib import Path

import trainkit

ROOT = Path(trainkit.__file__).parent

# The floors, lowest first: a module imports only from its own floor or a lower one. The root
# holds the base modules (BASE) that every floor may use.
FLOORS = ("trainkit", "trainkit.data", "trainkit.models", "trainkit.loop", "trainkit.run", "trainkit.commands")
BASE = {"trainkit.errors", "trainkit.registry", "trainkit.config", "trainkit.checkpoint", "trainkit.inputs",
        "trainkit.outputs", "trainkit.cachedir"}
# The package's face, above every floor: `import trainkit`'s names and `python -m trainkit`.
# Nothing inside the package imports them.
FACE = {"trainkit", "trainkit.__main__"}


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


def floor(name: str) -> int:
    """The floor's index in FLOORS (len(FLOORS) for the face)."""
    if name in FACE:
        return len(FLOORS)
    return max(i for i, package in enumerate(FLOORS) if name == package or name.startswith(package + "."))


def test_every_module_has_its_floor():
    """A module at the root is a base module or the face, said here; anything else goes in a floor's folder."""
    unplaced = [name for name in import_graph() if floor(name) == 0 and name not in BASE | FACE]
    assert unplaced == [], f"put {unplaced} in a floor's folder, or in BASE if every floor may use it"


def test_no_module_imports_a_floor_above_its_own():
    graph = import_graph()
    shown = [*FLOORS, "the face"]
    upward = [f"{name} ({shown[floor(name)]}) imports {edge} ({shown[floor(edge)]})"
              for name, edges in sorted(graph.items()) for edge in sorted(edges) if floor(edge) > floor(name)]
    assert upward == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_data_floor_reads_no_setting():
    """The data floor knows no TrainConfig: of the root it uses only these."""
    allowed = {"trainkit.errors", "trainkit.registry", "trainkit.checkpoint", "trainkit.cachedir", "trainkit.inputs"}
    for name, edges in import_graph().items():
        if floor(name) == 1:
            above = {e for e in edges if floor(e) != 1 and e not in allowed}
            assert not above, f"{name} imports {sorted(above)}"


def test_the_architecture_table_names_every_module():
    """docs/architecture.md's table: every module of the package in it, every path in it a file or folder."""
    doc = (ROOT.parent / "docs" / "architecture.md").read_text()
    rows = [line.split(" | ")[0] for line in doc.splitlines() if line.startswith("| `")]
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", "\n".join(rows)))
    assert named, "no module table in docs/architecture.md"
    missing = [p for p in named if not (ROOT / p).exists()]
    assert missing == [], f"docs/architecture.md names files that are not there: {sorted(missing)}"
    modules = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    unnamed = sorted(modules - named)
    assert unnamed == [], f"modules missing from docs/architecture.md's table: {unnamed}"


def test_no_module_name_of_an_unreleased_layout_is_kept():
    """The flat layout before the floors never had a release: its names are not served."""
    import importlib

    for old in ("engine", "callbacks", "devices", "rundir", "reports", "cli", "datasets", "emnist", "loaders"):
        assert importlib.util.find_spec(f"trainkit.{old}") is None, old
