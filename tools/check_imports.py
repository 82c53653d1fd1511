"""The import graph of domaintune, every import counted (module level, inside functions and
under ``TYPE_CHECKING``), checked for cycles and against the layer rules below.

    python tools/check_imports.py            # exit 1 with one line per broken rule
    python tools/check_imports.py --graph    # also print each module's imports of our own

Why not import-linter: it builds its graph (grimp) by walking the package's folder, and the
stages and flows live in the top-level ``tasks/`` and ``flows/`` folders mapped into the
package as ``domaintune.tasks`` / ``domaintune.flows`` by ``pyproject.toml``
(``[tool.setuptools] package-dir``), which grimp does not see: the rules that matter most
(library code never imports a stage) could not be stated. This script reads the same
mapping, so it sees every module under the name the code imports it by.

Run by ``make lint`` and by ``tests/test_architecture.py`` (so CI runs it).
"""

from __future__ import annotations

import argparse
import ast
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "domaintune"

#: The layers, lowest first: a module may import its own layer and the layers below, never
#: one above. A module is in the first layer one of whose prefixes it starts with (the
#: longest prefix decides). Everything not listed is "library" (the parts between the task
#: types and the stages).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "domaintune.errors",
            "domaintune.credentials",
            "domaintune.fingerprint",
            "domaintune.redaction",
            "domaintune.environment",
            "domaintune.progress",
            # the host's cores shared between processes (training ranks, scoring, generation)
            "domaintune.cpu_share",
            # per-example statistics, intervals and paired tests (numpy, pandas, pydantic):
            # the task types say how their metrics resample
            "domaintune.evidence",
        ),
    ),
    ("config", ("domaintune.config",)),
    (
        "storage",
        (
            "domaintune.storage",
            "domaintune.readers",
        ),
    ),
    ("models", ("domaintune.models",)),
    (
        "tasktypes",
        (
            "domaintune.tasktypes",
            "domaintune.chat",
            "domaintune.generation",
            "domaintune.inference",
        ),
    ),
    # the one way to load a task model (training, scoring, merging, chaining) sits on the
    # training strategies it applies
    ("training", ("domaintune.training", "domaintune.loading")),
    ("library", ()),
    # the one stage wrapper (retries, caching states, one-line errors) the flows use
    ("orchestration", ("domaintune.orchestration",)),
    ("stages", ("domaintune.tasks",)),
    # the tune flow's engine: it runs the finetune stage for each trial
    ("search", ("domaintune.tuning",)),
    ("flows", ("domaintune.flows",)),
    (
        "entry points",
        (
            "domaintune.cli",
            "domaintune.automations",
            "domaintune.landing",
            "domaintune.serving.serve",
            "domaintune.__main__",
        ),
    ),
]


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    function_level: bool

    def where(self, files: dict[str, Path]) -> str:
        kind = "in a function" if self.function_level else "at module level"
        path = files[self.importer]
        if path.is_relative_to(ROOT):
            path = path.relative_to(ROOT)
        return f"{path}:{self.line} ({kind})"


def module_files() -> dict[str, Path]:
    """Every module of the package under the name it is imported by: the folders of
    ``[tool.setuptools] package-dir`` (``tasks/`` is ``domaintune.tasks``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = project["tool"]["setuptools"]["package-dir"]
    files: dict[str, Path] = {}
    for package, folder in mapping.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            # a subpackage mapped elsewhere wins over the folder it sits in
            files.setdefault(name, path)
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" for a in child.names] or [base]
            for target in targets:
                if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                    continue
                imported = resolve(target)
                if imported and imported != name:
                    found.append(Import(name, imported, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        return next(i for i, (n, _) in enumerate(LAYERS) if n == "library")
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def package_init(module: str, imported: str) -> bool:
    """A package's ``__init__`` importing its own submodules (re-exports) is not a layer
    question."""
    return imported.startswith(module + ".")


def check(show_graph: bool = False) -> list[str]:
    files = module_files()
    modules = set(files)
    imports = [imp for name, path in files.items() for imp in imports_of(name, path, modules)]
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        edges[imp.importer].add(imp.imported)
    problems: list[str] = []
    for component in cycles(edges):
        members = set(component)
        links = list(
            dict.fromkeys(
                f"{i.importer} -> {i.imported} ({i.where(files)})"
                for i in imports
                if i.importer in members and i.imported in members
            )
        )
        problems.append(f"import cycle of {len(component)} modules: " + "; ".join(links))
    seen: set[tuple[str, str]] = set()
    for imp in imports:
        low, high = layer_of(imp.importer), layer_of(imp.imported)
        if high > low and not package_init(imp.importer, imp.imported):
            if (imp.importer, imp.imported) in seen:
                continue
            seen.add((imp.importer, imp.imported))
            problems.append(
                f"{imp.where(files)}: {imp.importer} ({LAYERS[low][0]}) imports "
                f"{imp.imported} ({LAYERS[high][0]}); rule: a layer imports only its own and "
                "lower layers (" + " < ".join(n for n, _ in LAYERS) + ")"
            )
    if show_graph:
        for m in sorted(edges):
            print(f"{m} [{LAYERS[layer_of(m)][0]}] -> {', '.join(sorted(edges[m])) or '-'}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graph", action="store_true")
    args = parser.parse_args()
    problems = check(args.graph)
    for p in problems:
        print(p)
    n = len(module_files())
    print(
        f"{n} modules: {'no cycle, every import within its layers' if not problems else f'{len(problems)} problems'}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
