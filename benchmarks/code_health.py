"""Code-health report of the opdlab package: file and function lengths, the import graph, its cycles and the
imports that go up the layer map below. A report, not a gate: it exits 0 unless --fail-on-circles is given.

    python benchmarks/code_health.py                          # this checkout's opdlab/
    python benchmarks/code_health.py --root /tmp/before       # another checkout (or its opdlab/ folder)
    python benchmarks/code_health.py --json /tmp/health.json  # the same numbers as JSON
    python benchmarks/code_health.py --fail-on-circles        # exit 1 when the import graph has a cycle

Stdlib only (ast, pathlib, argparse): it reads the files, it imports nothing of opdlab.

What counts:
- Modules are named by their path inside the package without ".py": `teachers/base`, `selectors/__init__`,
  `__init__` (the top-level package).
- An import site is every `import opdlab...` / `from opdlab... import ...` (relative imports resolved), at module
  level (eager; also inside a module-level `try`, `if` or class body) or inside a function (lazy). Imports under
  `if TYPE_CHECKING:` are listed as type-only and left out of the cycles and the upward count (they never run).
  `from opdlab.teachers import X` is an edge to `teachers/X` when X is a submodule, else to `teachers/__init__`;
  `import opdlab.a.b` is an edge to `a/b`. Dynamic imports (importlib, plugin entry points) are not seen.
- An edge is a (importer, imported) pair; it is lazy when none of its sites is eager.
- Cycles: the strongly connected components of more than one module in the graph of eager + lazy edges (the
  architecture's cycles; "eager-only" also gives those of the module-level edges, the ones that can break an
  import).
- Layers (LAYERS below, first match wins; a name also matches anything inside a package of that name, so
  `evaluation` places `evaluation/metrics`): an upward import is an edge from a module to one of a higher layer.
  A package `__init__` that re-exports its package is exempt for edges into its own package. Modules no pattern
  places are listed as unplaced and their edges are not judged.
- Interface -> implementation: a `base.py` importing a module of its own package other than base, rows or
  signal (the package's `__init__` included: it re-exports the implementations).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "opdlab"
LONG_FILE = 400  # lines: "files > 400 lines"
TOP = 15

# Layer map: (layer, name, patterns). Patterns are fnmatch patterns over module names (`teachers/base`); a
# pattern without "*" or "/" also matches `<name>/*` (the same name grown into a package).
LAYERS: list[tuple[int, str, list[str]]] = [
    (0, "core", ["__init__", "maths", "heads", "options", "rollout", "console", "distributed", "timing",
                 "checkpointing", "_deprecation", "progress", "runs", "sharding", "data", "metrics",
                 "loggers", "tasks/*", "chunks", "token_stats"]),
    (1, "interfaces", ["selectors/base", "divergences/base", "engines/base", "teachers/base", "teachers/rows",
                       "teachers/signal"]),
    # models loads checkpoints and resolves `toy:` names by building the toy: a component beside toy.
    (2, "components", ["models", "selectors/*", "divergences/*", "engines/*", "teachers/*", "adapters", "scoring", "loss",
                       "step", "evaluation*", "diagnostics/*", "callbacks/*", "toy"]),
    # Discovery sits above the interfaces and components it finds; the module uses it (the placement a teacher
    # string implies), so the module's rooms come after it.
    (3, "discovery", ["plugins"]),
    (4, "module", ["module", "module_*", "build", "building", "builder*", "export", "exports", "exporting",
                   "warnings", "model_warnings", "*_warnings", "student_checkpoint"]),
    (5, "commands", ["cli", "*_cli", "compare", "diagnose", "testing", "commands/*"]),
]
INTERFACE_SIBLINGS = {"base", "rows", "signal"}  # what a base.py may import from its own package


# --------------------------------------------------------------------------------------------- reading
@dataclass
class Site:
    importer: str
    imported: str
    line: int
    kind: str  # "eager", "lazy" or "typing"


@dataclass
class Package:
    root: Path  # the package folder
    modules: dict[str, Path] = field(default_factory=dict)  # name -> file
    lines: dict[str, int] = field(default_factory=dict)
    functions: list[tuple[str, str, int]] = field(default_factory=list)  # (qualified name, module, lines)
    sites: list[Site] = field(default_factory=list)
    unresolved: list[tuple[str, int, str]] = field(default_factory=list)  # (module, line, dotted name)


def module_name(package_root: Path, path: Path) -> str:
    return path.relative_to(package_root).with_suffix("").as_posix()


def dotted_to_module(dotted: str, modules: dict[str, Path]) -> tuple[str | None, bool]:
    """`opdlab.teachers.base` -> (`teachers/base`, exact); for a name that is not a module, its longest
    prefix that is (exact False), or None outside the package."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None, False
    parts = parts[1:]
    for n in range(len(parts), -1, -1):
        stem = "/".join(parts[:n])
        for name in (stem, f"{stem}/__init__" if stem else "__init__"):
            if name in modules:
                return name, n == len(parts)
    return None, False


def is_package(name: str) -> bool:
    return name == "__init__" or name.endswith("/__init__")


def dotted_of(name: str) -> str:
    """`teachers/__init__` -> `opdlab.teachers`, `teachers/base` -> `opdlab.teachers.base`."""
    stem = name[: -len("__init__")].rstrip("/") if is_package(name) else name
    return ".".join([PACKAGE, *([p for p in stem.split("/") if p])])


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class Visitor(ast.NodeVisitor):
    """Function lengths and import sites of one module."""

    def __init__(self, pkg: Package, name: str) -> None:
        self.pkg, self.name = pkg, name
        self.scope: list[str] = []  # qualified-name parts
        self.functions = 0  # function depth (> 0: lazy)
        self.typing = 0  # inside `if TYPE_CHECKING:`

    def kind(self) -> str:
        return "lazy" if self.functions else ("typing" if self.typing else "eager")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node) -> None:
        self.scope.append(node.name)
        self.pkg.functions.append((".".join(self.scope), self.name, node.end_lineno - node.lineno + 1))
        self.functions += 1
        self.generic_visit(node)
        self.functions -= 1
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if is_type_checking(node.test):
            self.typing += 1
            for child in node.body:
                self.visit(child)
            self.typing -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def add(self, dotted: str, line: int) -> None:
        target, exact = dotted_to_module(dotted, self.pkg.modules)
        if target is None or not exact:  # no such module here (a name Python would not find)
            self.pkg.unresolved.append((self.name, line, dotted))
        elif target != self.name:
            self.pkg.sites.append(Site(self.name, target, line, self.kind()))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                self.add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: from the importer's own package
            base = dotted_of(self.name).split(".")
            if not is_package(self.name):
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            dotted = ".".join(base + ([node.module] if node.module else []))
        else:
            dotted = node.module or ""
        if dotted.split(".")[0] != PACKAGE:
            return
        target, exact = dotted_to_module(dotted, self.pkg.modules)
        if target is not None and exact and is_package(target):  # `from opdlab.pkg import X`: X may be a module
            for alias in node.names:
                sub, sub_exact = dotted_to_module(f"{dotted}.{alias.name}", self.pkg.modules)
                self.add(f"{dotted}.{alias.name}" if sub_exact and sub != target else dotted, node.lineno)
        else:
            self.add(dotted, node.lineno)


def read_package(root: Path) -> Package:
    pkg = Package(root)
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    pkg.modules = {module_name(root, p): p for p in files}
    for name, path in pkg.modules.items():
        text = path.read_text(encoding="utf-8")
        pkg.lines[name] = len(text.splitlines())
        try:
            tree = ast.parse(text, filename=str(path))
        except SyntaxError as exc:
            print(f"code_health: {path}: not parsed ({exc})", file=sys.stderr)
            continue
        Visitor(pkg, name).visit(tree)
    return pkg


# --------------------------------------------------------------------------------------------- analysis
def layer_of(name: str) -> tuple[int, str] | None:
    for layer, label, patterns in LAYERS:
        for pattern in patterns:
            grows = "*" not in pattern and "/" not in pattern
            if fnmatch.fnmatchcase(name, pattern) or (grows and fnmatch.fnmatchcase(name, pattern + "/*")):
                return layer, label
    return None


def package_of(name: str) -> str:
    """The folder a module sits in ('' for the top level)."""
    return name.rsplit("/", 1)[0] if "/" in name else ""


def edges_of(sites: list[Site]) -> dict[tuple[str, str], list[Site]]:
    edges: dict[tuple[str, str], list[Site]] = defaultdict(list)
    for site in sites:
        edges[(site.importer, site.imported)].append(site)
    return dict(edges)


def edge_kind(sites: list[Site]) -> str:
    kinds = {s.kind for s in sites}
    return "eager" if "eager" in kinds else ("lazy" if "lazy" in kinds else "typing")


def strongly_connected(nodes: list[str], graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one node, each sorted, largest first."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found, key=lambda c: (-len(c), c))


def shortest_cycle(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One shortest cycle inside a component (breadth-first from each member), as a list of modules."""
    members, best = set(component), component
    for start in component:
        parents, frontier, found = {start: None}, [start], None
        while frontier and found is None:
            nxt = []
            for node in frontier:
                for child in sorted(graph.get(node, ())):
                    if child == start:
                        found = node
                        break
                    if child in members and child not in parents:
                        parents[child] = node
                        nxt.append(child)
                if found is not None:
                    break
            frontier = nxt
        if found is not None:
            path = [found]
            while parents[path[-1]] is not None:
                path.append(parents[path[-1]])
            if len(path) < len(best):
                best = list(reversed(path))
    return best


def analyse(pkg: Package) -> dict:
    edges = edges_of(pkg.sites)
    runtime = {e: s for e, s in edges.items() if edge_kind(s) != "typing"}
    graph: dict[str, set[str]] = defaultdict(set)
    eager_graph: dict[str, set[str]] = defaultdict(set)
    for (a, b), sites in runtime.items():
        graph[a].add(b)
        if edge_kind(sites) == "eager":
            eager_graph[a].add(b)
    nodes = sorted(pkg.modules)
    cycles = strongly_connected(nodes, graph)
    eager_cycles = strongly_connected(nodes, eager_graph)

    layers = {name: layer_of(name) for name in nodes}
    unplaced = [n for n in nodes if layers[n] is None]
    upward, interface = [], []
    for (a, b), sites in sorted(runtime.items()):
        la, lb = layers[a], layers[b]
        own = package_of(a)
        reexport = is_package(a) and (own == "" or b.startswith(own + "/"))
        if la is not None and lb is not None and lb[0] > la[0] and not reexport:
            upward.append({"importer": a, "importer_layer": la[0], "imported": b, "imported_layer": lb[0],
                           "lazy": edge_kind(sites) == "lazy", "lines": sorted({s.line for s in sites})})
        stem = a.rsplit("/", 1)[-1]
        if stem == "base" and package_of(b) == own and b.rsplit("/", 1)[-1] not in INTERFACE_SIBLINGS:
            interface.append({"importer": a, "imported": b, "lazy": edge_kind(sites) == "lazy",
                              "lines": sorted({s.line for s in sites})})

    longest_files = sorted(pkg.lines.items(), key=lambda kv: (-kv[1], kv[0]))
    longest_functions = sorted(pkg.functions, key=lambda f: (-f[2], f[1], f[0]))
    site_kinds = defaultdict(int)
    for s in pkg.sites:
        site_kinds[s.kind] += 1
    edge_kinds = defaultdict(int)
    for sites in edges.values():
        edge_kinds[edge_kind(sites)] += 1
    summary = {
        "circles": len(cycles),
        "upward_imports": len(upward),
        "upward_imports_lazy": sum(u["lazy"] for u in upward),
        "interface_to_implementation": len(interface),
        "files_over_400_lines": sum(1 for _, n in longest_files if n > LONG_FILE),
    }
    return {
        "package": str(pkg.root),
        "summary": summary,
        "modules": len(nodes),
        "total_lines": sum(pkg.lines.values()),
        "functions": len(pkg.functions),
        "import_sites": {"eager": site_kinds["eager"], "lazy": site_kinds["lazy"], "typing": site_kinds["typing"]},
        "edges": {"eager": edge_kinds["eager"], "lazy": edge_kinds["lazy"], "typing": edge_kinds["typing"]},
        "longest_files": [{"module": m, "file": str(pkg.modules[m].relative_to(pkg.root.parent)), "lines": n}
                          for m, n in longest_files[:TOP]],
        "longest_functions": [{"name": q, "file": str(pkg.modules[m].relative_to(pkg.root.parent)), "lines": n}
                              for q, m, n in longest_functions[:TOP]],
        "cycles": [{"modules": c, "example": shortest_cycle(c, graph),
                    "edges": [{"importer": a, "imported": b, "lazy": edge_kind(runtime[(a, b)]) == "lazy"}
                              for a in c for b in sorted(graph[a]) if b in c]} for c in cycles],
        "eager_cycles": eager_cycles,
        "upward": upward,
        "interface_to_implementation": interface,
        "unplaced": unplaced,
        "typing_only": [{"importer": a, "imported": b} for (a, b), s in sorted(edges.items())
                        if edge_kind(s) == "typing"],
        "unresolved": [{"module": m, "line": line, "name": d} for m, line, d in pkg.unresolved],
        "layers": {n: (layers[n][0] if layers[n] else None) for n in nodes},
    }


# --------------------------------------------------------------------------------------------- printing
def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_line(s: dict) -> str:
    return (f"circles: {s['circles']}, upward imports: {s['upward_imports']} (lazy: {s['upward_imports_lazy']}), "
            f"interface->implementation: {s['interface_to_implementation']}, "
            f"files > {LONG_FILE} lines: {s['files_over_400_lines']}")


def report(r: dict) -> str:
    def lazy(flag: bool) -> str:
        return "lazy" if flag else "eager"

    def layer(n: str) -> str:
        value = r["layers"].get(n)
        return f"{n} ({value})" if value is not None else f"{n} (?)"

    out = [f"# Code health: {r['package']}", "",
           f"{r['modules']} modules, {r['total_lines']:,} lines, {r['functions']} functions/methods; import sites "
           f"of opdlab modules: {r['import_sites']['eager']} module-level, {r['import_sites']['lazy']} lazy (in a "
           f"function), {r['import_sites']['typing']} type-only; edges (importer, imported): {r['edges']['eager']} "
           f"with a module-level site, {r['edges']['lazy']} lazy only, {r['edges']['typing']} type-only.", "",
           "**" + summary_line(r["summary"]) + "**", "",
           f"## Lines per file (top {TOP}; {r['summary']['files_over_400_lines']} over {LONG_FILE})", "",
           table(["file", "lines"], [[f["file"], f"{f['lines']:,}"] for f in r["longest_files"]]), "",
           f"## Longest functions and methods (top {TOP})", "",
           table(["function", "file", "lines"],
                 [[f"`{f['name']}`", f["file"], f["lines"]] for f in r["longest_functions"]]),
           "", f"## Import cycles ({len(r['cycles'])} strongly connected components of eager + lazy edges; "
           f"{len(r['eager_cycles'])} of module-level edges alone)", ""]
    if r["cycles"]:
        rows = []
        for i, c in enumerate(r["cycles"], 1):
            example = " -> ".join(c["example"] + c["example"][:1])
            inside = ", ".join(f"{e['importer']} -> {e['imported']}{' (lazy)' if e['lazy'] else ''}"
                               for e in c["edges"])
            rows.append([i, len(c["modules"]), ", ".join(c["modules"]), example, inside])
        out += [table(["#", "modules", "members", "a shortest cycle", "edges inside"], rows), ""]
        if r["eager_cycles"]:
            out += ["Module-level cycles: " + "; ".join(", ".join(c) for c in r["eager_cycles"]), ""]
    else:
        out += ["None.", ""]
    out += [f"## Upward imports ({r['summary']['upward_imports']}, lazy {r['summary']['upward_imports_lazy']})", "",
            "Layers: " + "; ".join(f"{n} {label} ({', '.join(p)})" for n, label, p in LAYERS) + ".", ""]
    out += [table(["importer (layer)", "imports (layer)", "lines", "site"],
                  [[layer(u["importer"]), layer(u["imported"]), ", ".join(map(str, u["lines"])), lazy(u["lazy"])]
                   for u in r["upward"]]) if r["upward"] else "None.", ""]
    out += [f"## Interface -> implementation ({r['summary']['interface_to_implementation']})", "",
            table(["interface", "imports", "lines", "site"],
                  [[u["importer"], u["imported"], ", ".join(map(str, u["lines"])), lazy(u["lazy"])]
                   for u in r["interface_to_implementation"]]) if r["interface_to_implementation"] else "None.", ""]
    out += ["## Unplaced modules (no layer pattern: their edges are not judged)", "",
            ", ".join(r["unplaced"]) if r["unplaced"] else "None.", ""]
    if r["typing_only"]:
        out += ["Type-only edges (under `if TYPE_CHECKING:`, not counted): "
                + ", ".join(f"{e['importer']} -> {e['imported']}" for e in r["typing_only"]), ""]
    if r["unresolved"]:
        out += ["Imports of opdlab names that are no module here: "
                + ", ".join(f"{u['module']}:{u['line']} {u['name']}" for u in r["unresolved"]), ""]
    out += [summary_line(r["summary"])]
    return "\n".join(out)


def package_root(root: Path) -> Path:
    if (root / PACKAGE / "__init__.py").is_file():
        return root / PACKAGE
    if (root / "__init__.py").is_file():
        return root
    sys.exit(f"code_health: no {PACKAGE}/ package under {root}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                   help=f"a checkout (its {PACKAGE}/ is read) or the package folder itself (default: this checkout)")
    p.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    p.add_argument("--fail-on-circles", action="store_true", help="exit 1 when the import graph has a cycle")
    args = p.parse_args()
    result = analyse(read_package(package_root(args.root.resolve())))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if args.fail_on_circles and result["summary"]["circles"] else 0


if __name__ == "__main__":
    sys.exit(main())
