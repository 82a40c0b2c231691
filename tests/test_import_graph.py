"""The package's modules depend one way: each import goes down the layer order below, never up or sideways.

Parsed from the source with ``ast`` (imports inside functions count too), so a lazy import cannot hide an edge.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

SRC = Path(__file__).resolve().parents[1] / "src" / "vlprune"

# Lowest first. A module may import modules of its own component or of a lower layer. Modules of one layer that
# are not the same component (train / bench / viz) do not import each other. Layer 0 holds the small utilities,
# which import nothing of the package but each other.
LAYERS: List[Set[str]] = [
    {"version", "errors", "fileio", "distributed", "flopcount", "optim", "checkpoint", "stats", "rundir", "runtime"},
    {"config", "recipes"},
    {"reduce"},
    {"models"},
    {"patch"},
    {"objectives"},
    {"data"},
    {"tasks"},
    {"train_data", "prepare"},
    {"train", "bench", "viz"},
    {"paper_recipes"},
    {"demo"},
    {"commands"},
    {"cli"},
    {"__init__", "__main__"},
]

# Edges allowed against the order: none. Keep it so.
KNOWN_EXCEPTIONS: Set[Tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts)


def imports() -> List[Tuple[str, str]]:
    """(importing module, imported module) pairs inside the package, e.g. ("tasks.classify", "models.heads")."""
    edges = []
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
                edges.append((mod, target or "__init__"))
            elif isinstance(node, ast.Import):
                edges += [(mod, a.name[len("vlprune."):]) for a in node.names if a.name.startswith("vlprune.")]
    return edges


def component(mod: str) -> str:
    return mod.split(".")[0]


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
    state: Dict[str, int] = {}

    def visit(node: str, path: List[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])

