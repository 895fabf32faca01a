"""The import graph of ptq4vm_jax/, convert/ and pallas_kernels/ keeps its layers.

Every import statement in a file counts, at module level or inside a function (a lazy import
hides a cycle, it does not remove it); only imports under ``if TYPE_CHECKING:`` are exempt.
Rules: no cycle; ``convert`` and ``pallas_kernels`` are leaves (nothing from ``ptq4vm_jax`` or
from each other); inside ``ptq4vm_jax`` a module imports only modules of its own rank or below
(``RANKS``); ``import convert`` loads no jax, flax or orbax.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ptq4vm_jax", "convert", "pallas_kernels")
LEAVES = ("convert", "pallas_kernels")

# Layers of ptq4vm_jax, bottom to top: a module may import its own rank and below. The longest
# matching prefix gives a module's rank; a module no entry matches fails test_every_module_has_a_rank.
RANKS: dict[str, int] = {
    "ptq4vm_jax.errors": 0,  # error types every layer raises
    "ptq4vm_jax.lazy": 0,  # package attributes loaded on first use
    "ptq4vm_jax.choices": 0,  # names of the runtime choices (backends, modes), without jax
    "ptq4vm_jax.gpu": 0,  # whether programs compile for a GPU: the one place the platform is read
    "ptq4vm_jax.assets": 0,  # where the bundled micro models are
    "ptq4vm_jax.trees": 0,  # nested-dict helpers
    "ptq4vm_jax.progress": 0,  # progress bars and log lines of long loops
    "ptq4vm_jax.dirs": 0,  # checks on the directories a run writes
    "ptq4vm_jax.held_signals": 0,  # Ctrl-C / SIGTERM held while a write finishes or is undone
    "ptq4vm_jax.models": 1,
    "ptq4vm_jax.ops": 1,
    "ptq4vm_jax.quant": 2,
    "ptq4vm_jax.calibrate": 3,
    "ptq4vm_jax.checkpoint": 4,
    "ptq4vm_jax.data": 4,  # input pipelines: read by api (calibration images) and the CLI
    "ptq4vm_jax.distributed": 4,
    "ptq4vm_jax.api": 5,
    "ptq4vm_jax.api_checks": 5,  # the input checks of api
    "ptq4vm_jax.evaluate": 6,
    "ptq4vm_jax.compare": 6,  # how two models' outputs differ (used by report and the demo)
    "ptq4vm_jax.report": 6,  # `ptq4vm report`: numbers, figures, html (uses api and compare)
    "ptq4vm_jax.cli": 7,
    "ptq4vm_jax": 7,  # the package's public names (its __init__), imported by the CLI
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (of the three packages)
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import in the file, at any depth, except in the body of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (None: outside the three packages)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports() -> list[Import]:
    modules = _modules()
    edges = []
    for source, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 more
                    package = source if is_package else source.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}".rstrip(".") if base else package
                # ``from pkg import sub`` imports the submodule pkg.sub when there is one
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for name in names:
                target = _resolve(name, modules)
                if target is not None and target != source:
                    edges.append(Import(source, target, where))
    return edges


def _rank(module: str) -> int | None:
    matches = [prefix for prefix in RANKS if module == prefix or module.startswith(prefix + ".")]
    return RANKS[max(matches, key=len)] if matches else None


def test_every_module_has_a_rank() -> None:
    missing = [m for m in _modules() if m.startswith("ptq4vm_jax") and _rank(m) is None]
    assert not missing, (f"modules without a layer: {missing}; add each to RANKS in {Path(__file__).name} "
                         "at the rank of what it imports")


def test_no_import_cycle() -> None:
    graph: dict[str, list[Import]] = {}
    for edge in _imports():
        graph.setdefault(edge.source, []).append(edge)
    cycles: list[list[Import]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[Import] = []

    def visit(module: str) -> None:
        state[module] = 1
        for edge in graph.get(module, []):
            if state.get(edge.target) == 1:
                start = next(i for i, e in enumerate(path + [edge]) if e.source == edge.target)
                cycles.append((path + [edge])[start:])
            elif edge.target not in state:
                path.append(edge)
                visit(edge.target)
                path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    shown = "\n".join(" -> ".join(e.source for e in c) + f" -> {c[0].source}\n    "
                      + "\n    ".join(map(str, c)) for c in cycles)
    assert not cycles, f"import cycles (a lazy import counts):\n{shown}"


def test_leaves_import_nothing_from_the_other_packages() -> None:
    bad = [e for e in _imports() if e.source.split(".")[0] in LEAVES
           and e.target.split(".")[0] != e.source.split(".")[0]]
    assert not bad, ("convert/ and pallas_kernels/ are leaves: they import nothing from ptq4vm_jax/ or "
                     "from each other:\n" + "\n".join(map(str, bad)))


def test_layers_of_ptq4vm_jax() -> None:
    bad = []
    for e in _imports():
        if e.source.startswith("ptq4vm_jax") and e.target.startswith("ptq4vm_jax"):
            low, high = _rank(e.source), _rank(e.target)
            if low is not None and high is not None and high > low:
                bad.append(f"{e} (rank {low} imports rank {high})")
    assert not bad, ("imports against the layers models/ops < quant < calibrate < checkpoint < api < cli "
                     "(RANKS):\n" + "\n".join(bad))


def test_import_convert_loads_no_jax() -> None:
    code = ("import sys, convert, convert.vim, convert.vmamba\n"
            "print(' '.join(m for m in ('jax', 'flax', 'orbax', 'ptq4vm_jax', 'pallas_kernels') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "", f"import convert loaded {out.stdout.strip()}"


def test_the_packages_export_their_names_lazily() -> None:
    """``ptq4vm_jax`` and ``ptq4vm_jax.cli`` load no jax on import (the console command holds
    Ctrl-C before jax loads), nor does the parser (``ptq4vm --help`` and a mistyped flag need
    none, nor numpy and ml_dtypes, which are slow to import), and every public name the packages
    list resolves to its module's object."""
    code = ("import sys, ptq4vm_jax, ptq4vm_jax.cli, ptq4vm_jax.cli.entry, ptq4vm_jax.cli.app; "
            "ptq4vm_jax.cli.app.build_parser(); "
            "print(sorted(m for m in ('jax', 'flax', 'orbax', 'numpy', 'ml_dtypes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import importlib

    for package in ("ptq4vm_jax", "ptq4vm_jax.cli", "convert"):
        module = importlib.import_module(package)
        assert sorted(module.__all__) == sorted(module._EXPORTS)
        for name, home in module._EXPORTS.items():
            assert getattr(module, name) is getattr(importlib.import_module(home), name)
    import ptq4vm_jax

    assert ptq4vm_jax.api is importlib.import_module("ptq4vm_jax.api")  # submodules as attributes
    code = "import convert; print(convert.mapping.Rule.__name__, convert.vim.SPEC.__class__.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["Rule", "FamilySpec"]
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        ptq4vm_jax.no_such_name  # noqa: B018


def test_lazy_packages_reach_their_submodules_and_list_only_their_api() -> None:
    """``ptq4vm_jax.quant.config.QuantConfig`` works after ``import ptq4vm_jax`` alone, as it did
    when the package imported everything; ``dir()`` lists the API; other names are refused."""
    code = ("import ptq4vm_jax as pq; "
            "print(pq.quant.config.QuantConfig.__name__, pq.ops.scan.selective_scan_ref.__name__, "
            "pq.calibrate.jlss.__name__, pq.cli.run.__name__); "
            "print(sorted(n for n in dir(pq.cli) if not n.startswith('_'))); "
            "print(pq.assets.ASSETS.name, hasattr(pq, '__main__'), 'TYPE_CHECKING' in dir(pq))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names, cli_dir, refused = out.splitlines()
    assert names == "QuantConfig selective_scan_ref ptq4vm_jax.calibrate.jlss run"
    assert {"build_parser", "main", "run", "app", "entry"} <= set(eval(cli_dir))
    assert refused == "assets False False"


def test_only_the_gpu_module_reads_the_platform() -> None:
    """``ptq4vm_jax.gpu`` is the one place the library asks jax which platform it compiles for
    ("auto" backends, the Pallas interpreter off the GPU); everything else takes its backend as
    an argument, so a test fakes the platform by patching that module alone."""
    readers = []
    for name, path in _modules().items():
        if not name.startswith("ptq4vm_jax") or name == "ptq4vm_jax.gpu":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("default_backend", "compute_capability"):
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not readers, "read the platform through ptq4vm_jax.gpu instead: " + ", ".join(readers)
