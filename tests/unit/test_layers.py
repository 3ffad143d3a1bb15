"""The house rules, read from the code's own imports (top-level and inside functions).

Contexts are stacked one way: a package imports only packages on its own floor or below, no
import circle anywhere in chalicelib/ or local/, and no module uses another module's `_private`
name. The README's Layout draws the stack; a reaction of a lower context to a higher one goes
through the bus (chalicelib/bus.py, wired in chalicelib/wiring.py), not an import.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imports  # noqa: E402  (tests/unit/imports.py, beside this file)

# floor of each package: higher floors may import lower ones, never the reverse
FLOORS = {
    "chalicelib.api": 10, "chalicelib.dataplane": 10, "chalicelib.console": 10,
    "chalicelib.wiring": 9, "chalicelib.reconciler": 9, "chalicelib.slack": 9,
    "chalicelib.pipelines": 8,
    "chalicelib.evaluation": 7,
    "chalicelib.training": 6,
    "chalicelib.grading": 5,
    "chalicelib.inference": 4,
    "chalicelib.spend": 3,
    "chalicelib.platform": 2,
    # the kernel: shared by every context, imports no context
    "chalicelib.outbox": 1, "chalicelib.bus": 1, "chalicelib.cache": 1, "chalicelib.failures": 1,
    "chalicelib.metrics": 1, "chalicelib.tracing": 1,
    "chalicelib.domain": 0, "chalicelib.store": 0, "chalicelib.adapters": 0, "chalicelib.config": 0,
    "chalicelib.errors": 0, "chalicelib.log": 0, "chalicelib.deadline": 0, "chalicelib": 0,
}


def floor(module: str) -> int | None:
    """The floor of a chalicelib module (its longest listed prefix); None outside chalicelib."""
    if not module.startswith("chalicelib"):
        return None
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in FLOORS:
            return FLOORS[name]
    raise AssertionError(f"{module}: no floor for it in FLOORS (add its package)")


def upward(modules: dict[str, imports.Module]) -> list[str]:
    found = []
    for mod in modules.values():
        own = floor(mod.name)
        for target, lines in mod.imports.items():
            if mod.name.startswith("chalicelib") and target.startswith("local"):
                found.append(f"{mod.name}:{lines[0]} imports the local stack ({target})")
            theirs = floor(target)
            if own is not None and theirs is not None and theirs > own:
                found.append(f"{mod.name}:{lines[0]} -> {target} (floor {own} imports floor {theirs})")
    return found


@pytest.fixture(scope="module")
def graph():
    return imports.read()


def test_no_module_imports_a_context_above_its_own(graph):
    assert upward(graph) == []


def test_no_import_circle_in_chalicelib_or_local(graph):
    assert imports.circles(graph) == []


def test_no_module_uses_another_modules_private_names(graph):
    reach = [f"{m.name}:{line} -> {target}.{name}" for m in graph.values() for target, name, line in m.privates]
    assert reach == []


def test_the_rules_catch_what_they_are_for(tmp_path):
    """The checks above are only worth their silence if they fire: an upward import inside a
    function, a circle and a private reach-in, in a small tree of their own."""
    pkg = tmp_path / "chalicelib"
    for sub in ("training", "evaluation"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "training" / "jobs.py").write_text(
        "def finalize():\n    from chalicelib.evaluation import evals\n    return evals._private()\n")
    (pkg / "evaluation" / "evals.py").write_text("from chalicelib.training import jobs\n\ndef _private():\n    pass\n")
    graph = imports.read(tmp_path, packages=("chalicelib",))
    assert upward(graph) == ["chalicelib.training.jobs:2 -> chalicelib.evaluation.evals (floor 6 imports floor 7)"]
    assert imports.circles(graph) == [["chalicelib.evaluation.evals", "chalicelib.training.jobs"]]
    assert [(m.name, t, n) for m in graph.values() for t, n, _ in m.privates] == [
        ("chalicelib.training.jobs", "chalicelib.evaluation.evals", "_private")]
