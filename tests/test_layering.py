"""Imports run one way: tasks -> models -> theory -> training/runners -> analysis -> experiments -> report/cli.

Every module of the package is assigned to one layer below (a new module must be added, or this test
fails naming it); a module may import from its own layer and the layers before it, never after.
The imports are read from the source with ``ast``, function-level imports included.
"""
import ast
from pathlib import Path

import assocmem

ROOT = Path(assocmem.__file__).parent

# layer -> module name prefixes (the longest matching prefix decides)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("assocmem.config", "assocmem.io", "assocmem.procs", "assocmem.blas", "assocmem.plots",
              "assocmem.registry", "assocmem.findings")),
    ("tasks", ("assocmem.tasks", "assocmem.hijack.counterfact", "assocmem.hijack.schemes",
               "assocmem.hijack.lengths", "assocmem.hijack.demo")),
    ("models", ("assocmem.models", "assocmem.llm", "assocmem.hijack.testing")),
    ("theory", ("assocmem.theory",)),
    ("training/runners", ("assocmem.training", "assocmem.runners", "assocmem.store", "assocmem.sweep",
                          "assocmem.ray_backend", "assocmem.hijack.evaluate", "assocmem.hijack.store")),
    ("analysis", ("assocmem.analysis", "assocmem.hijack.explain", "assocmem.hijack.explain_patch")),
    ("experiments", ("assocmem.experiments", "assocmem.hijack.explain_plots", "assocmem.hijack.explain_report",
                     "assocmem.hijack.leaderboard", "assocmem.hijack.leaderboard_render")),
    ("report/cli", ("assocmem.report", "assocmem.cli", "assocmem.hijack.cli", "assocmem.hijack.explain_cli")),
]


def module_name(path: Path) -> str:
    parts = ("assocmem",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def layer_of(mod: str) -> int | None:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (mod == pre or mod.startswith(pre + ".")) and len(pre) > best:
                best, rank = len(pre), i
    return rank


def imports(mod: str) -> set[str]:
    """Package modules that ``mod`` imports (``from .x import y`` counts module x.y when it is one)."""
    path = MODULES[mod]
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("assocmem")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("assocmem"):
                target = node.module
            else:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in MODULES else target)
    return out - {"assocmem"}          # the package root holds only __version__


def test_every_module_has_a_layer():
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    unassigned = sorted(m for m in MODULES if m not in packages and layer_of(m) is None)
    assert not unassigned, f"add these modules to LAYERS: {unassigned}"


def upward(graph: dict[str, set[str]]) -> list[str]:
    """The edges of ``{module: imported modules}`` that point to a later layer."""
    bad = []
    for mod in sorted(graph):
        mine = layer_of(mod)
        for dep in sorted(graph[mod]):
            theirs = layer_of(dep)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{mod} ({LAYERS[mine][0]}) imports {dep} ({LAYERS[theirs][0]})")
    return bad


def test_imports_run_one_way():
    bad = upward({m: imports(m) for m in MODULES})
    assert not bad, "\n".join(bad)


def test_the_checker_finds_an_upward_import():
    """The rule can fail: a runner importing an experiment module is reported; the reverse is not."""
    assert "assocmem.analysis.lca" in imports("assocmem.experiments.lca_families")
    assert upward({"assocmem.runners.lca": {"assocmem.experiments.lca"}}) == [
        "assocmem.runners.lca (training/runners) imports assocmem.experiments.lca (experiments)"]
    assert upward({"assocmem.experiments.lca": {"assocmem.runners.lca"}}) == []
