"""The package's modules depend one way: each import goes down the layer order below, never up or sideways, and
no import circle runs between the modules of one package either.

Parsed from the source with ``ast`` (imports inside functions count too), so a lazy import cannot hide an edge.
``from . import name`` is an edge to the module ``name`` when it is one (else to the package's ``__init__``).
"""

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

SRC = Path(__file__).resolve().parents[1] / "src" / "vlprune"

# Lowest first. A module may import modules of its own component or of a lower layer. Modules of one layer that
# are not the same component (train / bench / viz) do not import each other. Layer 0 holds the small utilities,
# which import nothing of the package but each other.
LAYERS: List[Set[str]] = [
    {"version", "errors", "fileio", "distributed", "flopcount", "optim", "checkpoint", "stats", "rundir", "runtime",
     "registry"},
    {"config", "recipes"},
    {"reduce"},
    {"models"},
    {"patch"},
    {"objectives"},
    {"data"},
    {"tasks"},
    {"train_data", "guards", "prepare"},
    {"train", "bench", "viz"},
    {"paper_recipes"},
    {"demo"},
    {"protocols"},
    {"commands"},
    {"cli"},
    {"__init__", "__main__"},
]

# Edges allowed against the order: none. Keep it so.
KNOWN_EXCEPTIONS: Set[Tuple[str, str]] = set()
# Edges allowed to close a circle inside a package: none. Keep it so.
KNOWN_PACKAGE_CYCLE_EDGES: Set[Tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts)


def _modules() -> Set[str]:
    return {_module_name(p) for p in SRC.rglob("*.py")}


def _package_init(target: str) -> str:
    """The module a package name stands for: its ``__init__``."""
    return f"{target}.__init__" if target else "__init__"


def imports() -> List[Tuple[str, str]]:
    """(importing module, imported module) pairs inside the package, e.g. ("tasks.classify", "models.heads"); a
    package is named by its ``__init__`` module (e.g. "reduce.__init__")."""
    edges = []
    known = _modules()
    for path in sorted(SRC.rglob("*.py")):
        mod = _module_name(path)
        package = mod.split(".")[:-1]  # the package a relative import starts from (for __init__ too)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and (node.module == "vlprune" or node.module.startswith("vlprune.")):
                    target = node.module[len("vlprune."):] if node.module != "vlprune" else ""
                else:
                    continue
                subs = [f"{target}.{a.name}" if target else a.name for a in node.names]
                if subs and all(s in known for s in subs):  # from PACKAGE import module, module
                    edges += [(mod, s) for s in subs]
                else:
                    edges.append((mod, target if target in known else _package_init(target)))
            elif isinstance(node, ast.Import):
                edges += [(mod, a.name[len("vlprune."):]) for a in node.names if a.name.startswith("vlprune.")]
    return edges


def component(mod: str) -> str:
    return mod.split(".")[0]


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle of ``graph`` as a path, or []."""
    state: Dict[str, int] = {}

    def visit(node: str, path: List[str]) -> List[str]:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return []


def layer_of(comp: str) -> int:
    for i, layer in enumerate(LAYERS):
        if comp in layer:
            return i
    raise AssertionError(f"component {comp!r} is not in the layer order of tests/test_import_graph.py; add it")


def test_every_component_has_a_layer():
    for path in SRC.rglob("*.py"):
        layer_of(component(_module_name(path)))


def test_no_import_against_the_layer_order():
    bad = []
    for a, b in imports():
        ca, cb = component(a), component(b)
        if ca == cb or (a, b) in KNOWN_EXCEPTIONS:
            continue
        la, lb = layer_of(ca), layer_of(cb)
        if lb > la or (lb == la and la != 0):
            bad.append(f"{a} -> {b}")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(set(bad)))


def test_no_cycle_between_components():
    graph: Dict[str, Set[str]] = {}
    for a, b in imports():
        if component(a) != component(b) and (a, b) not in KNOWN_EXCEPTIONS:
            graph.setdefault(component(a), set()).add(component(b))
    cycle = _cycle(graph)
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_no_cycle_inside_a_package():
    """Modules of one package (e.g. patch.core and the family modules) never import each other in a circle: the
    registries keep it so (a package's ``__init__`` imports the modules that register; the core never does)."""
    graph: Dict[str, Set[str]] = {}
    for a, b in imports():
        if component(a) == component(b) and a != b and (a, b) not in KNOWN_PACKAGE_CYCLE_EDGES:
            graph.setdefault(a, set()).add(b)
    cycle = _cycle(graph)
    assert not cycle, f"import cycle inside a package: {' -> '.join(cycle)}"


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
