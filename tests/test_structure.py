"""seglab's packages form layers: no import cycle, and no layer imports one above it.

Read statically from the source (every `import`, function-local and TYPE_CHECKING ones included,
since a deferred import is still a dependency), so the check needs neither TensorFlow nor a run.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "seglab"

# Bottom to top. A part may import its own layer's and lower layers' parts (but see FORBIDDEN).
LAYERS = [
    {"config", "atomic", "digest", "records", "stage_trace"},
    {"data"},
    {"models"},
    {"metrics"},
    {"train", "evaluate", "gan"},
    {"warehouse"},
    {"cli"},
]
# Within the training/evaluation/GAN layer: training and the GANs stand alone.
FORBIDDEN = {("train", "gan"), ("train", "evaluate"), ("gan", "train"), ("gan", "evaluate")}


def _part(module: str) -> str | None:
    """The part of seglab a module belongs to: its subpackage, or the top-level module itself."""
    names = module.split(".")
    if names[0] != "seglab" or len(names) < 2:
        return None
    return names[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports anywhere in its body."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            # `from seglab import metrics` imports the module seglab.metrics.
            names.update(f"{base}.{alias.name}" for alias in node.names if base == "seglab")
    return names


def import_graph() -> dict[tuple[str, str], list[str]]:
    """(importing part, imported part) -> the modules where that import happens."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(SRC.rglob("*.py")):
        source = _part(_module_name(path))
        for name in _imported(path):
            target = _part(name)
            if source and target and target != source:
                edges[source, target].append(path.relative_to(SRC.parent).as_posix())
    return edges


def _cycles(edges) -> list[list[str]]:
    """One cycle per strongly connected group of parts (Tarjan), each as a closed path."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:
        start = min(group)
        path, seen = [start], {start}
        # Walk inside the group until a part repeats: that closes a cycle.
        while True:
            nxt = min(n for n in graph[path[-1]] if n in group)
            if nxt in seen:
                cycles.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def _layer(part: str) -> int:
    for rank, layer in enumerate(LAYERS):
        if part in layer:
            return rank
    raise AssertionError(f"seglab.{part} is in no layer of tests/test_structure.py LAYERS; place it there")


def _describe(edges, pairs) -> str:
    return "\n".join(f"  seglab.{a} -> seglab.{b} (in {', '.join(sorted(set(edges[a, b])))})" for a, b in pairs)


def test_the_import_graph_finds_local_relative_and_from_imports():
    edges = import_graph()
    # cli imports every stage inside its handlers; the parser sees function-local imports.
    assert {("cli", "data"), ("cli", "train"), ("cli", "warehouse")} <= set(edges)
    assert _cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c", "a"]]


def test_no_import_cycle_among_seglab_parts():
    edges = import_graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles among seglab's parts:\n" + "\n".join(
        " -> ".join(cycle) + "\n" + _describe(edges, zip(cycle, cycle[1:])) for cycle in cycles)


def test_no_part_imports_a_layer_above_it():
    edges = import_graph()
    upward = sorted((a, b) for a, b in edges if _layer(b) > _layer(a) or (a, b) in FORBIDDEN)
    assert not upward, "imports against the layering (data -> models -> metrics -> train/evaluate/gan " \
                       "-> warehouse -> cli):\n" + _describe(edges, upward)
