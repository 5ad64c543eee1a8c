"""The package's import arrows point one way (README, Architecture), and its functions stay short.

The imports are read from the source (every ``import`` and ``from ... import``, also those inside
functions), so a lazy import cannot hide an arrow.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "interclr_cli"

#: The layers, top first: a unit may import its own layer's other units (without a cycle) and any
#: layer below it, never one above. A unit is a subpackage or a top-level module.
LAYERS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"commands"},
    {"training"},
    {"methods"},
    {"memory", "losses", "data", "eval", "models"},
    {"config"},
    {"runtime"},
    {"errors"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
MAX_FUNCTION_LINES = 80


def _module_name(path: Path, root: Path) -> tuple[list[str], bool]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    return (parts[:-1] if is_pkg else parts), is_pkg


def _targets(node: ast.AST, parts: list[str], is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if not node.level:
        return [node.module or ""]
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    if node.module:
        return [".".join(base + [node.module])]
    return [".".join(base + [a.name]) for a in node.names]  # from .. import x: x may be a module


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PKG.name:
        return None
    return parts[1] if len(parts) > 1 else "(package)"


def import_edges(root: Path = PKG) -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the files that make that arrow."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        parts, is_pkg = _module_name(path, root)
        src = parts[1] if len(parts) > 1 else "(package)"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, parts, is_pkg):
                dst = _unit(target)
                if dst is not None and dst != src:
                    edges[(src, dst)].append(str(path.relative_to(root)))
    return edges


def layer_violations(edges) -> list[str]:
    """Arrows from a lower layer to a higher one, and arrows from or to a unit no layer lists."""
    bad = []
    for (src, dst), files in sorted(edges.items()):
        if src not in RANK or dst not in RANK:
            bad.append(
                f"{src} -> {dst} ({files[0]}): {src if src not in RANK else dst} is in no layer; add it to LAYERS"
            )
        elif RANK[dst] < RANK[src]:
            bad.append(f"{src} -> {dst} ({files[0]}): a lower layer imports a higher one")
    return bad


def cycles(edges) -> list[list[str]]:
    """Every cycle among the units (depth-first search; each cycle reported once)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in edges:
        graph[src].add(dst)
    found, seen = [], set()

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cyc = stack[stack.index(nxt) :]
                key = frozenset(cyc)
                if key not in seen:
                    seen.add(key)
                    found.append(cyc + [nxt])
            elif len(stack) < len(graph) + 1:
                visit(nxt, stack + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_imports_point_down_the_layers_without_cycles():
    edges = import_edges()
    assert edges, "no imports found: the test reads the wrong folder"
    assert layer_violations(edges) == []
    assert cycles(edges) == []


def test_every_unit_of_the_package_is_in_a_layer():
    units = {
        p.stem if p.is_file() else p.name
        for p in PKG.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    }
    assert units - set(RANK) == set(), "add new subpackages/modules to LAYERS"


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    # the mistake, made once: runtime importing training (upward), and memory <-> data (a cycle)
    pkg = tmp_path / PKG.name
    for sub in ("runtime", "training", "memory", "data"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "runtime" / "dist.py").write_text("def f():\n    from ..training import loop\n")
    (pkg / "memory" / "bank.py").write_text("from ..data import sources\n")
    (pkg / "data" / "sources.py").write_text("from interclr_cli.memory.bank import x\n")
    edges = import_edges(pkg)
    assert [v.split(":")[0] for v in layer_violations(edges)] == ["runtime -> training (runtime/dist.py)"]
    assert cycles(edges) == [["data", "memory", "data"]]


def test_no_function_in_the_package_is_longer_than_80_lines():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    assert long == [], "split these into functions of one job each"
