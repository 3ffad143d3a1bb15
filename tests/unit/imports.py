"""The import graph of rft-hub's own code, read from the source (top-level and in-function imports).

Used by tests/unit/test_layers.py and runnable alone (`python -m tests.unit.imports`) to print the
figures: circles, imports that run up the stack, reach-ins to another module's `_private` names, and the
largest modules.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("chalicelib", "local")


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    imports: dict[str, list[int]] = field(default_factory=dict)   # imported module -> line numbers
    privates: list[tuple[str, str, int]] = field(default_factory=list)  # (module, name, line)


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    if not level:
        return target or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def read(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    files = [p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))]
    known = {_module_name(p, root) for p in files}
    for path in files:
        name = _module_name(path, root)
        text = path.read_text()
        mod = modules[name] = Module(name, path, text.count("\n"))
        tree = ast.parse(text)
        aliases: dict[str, str] = {}   # local name -> our module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in packages:
                        mod.imports.setdefault(alias.name, []).append(node.lineno)
                        if alias.asname:
                            aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node.level, node.module)
                if target.split(".")[0] not in packages:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in known:          # `from chalicelib.services import jobs`
                        mod.imports.setdefault(sub, []).append(node.lineno)
                        aliases[alias.asname or alias.name] = sub
                    else:
                        mod.imports.setdefault(target, []).append(node.lineno)
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            mod.privates.append((target, alias.name, node.lineno))
        for node in ast.walk(tree):       # module._private
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                mod.privates.append((aliases[node.value.id], node.attr, node.lineno))
    for mod in modules.values():      # keep edges to our own modules only, not to a module's self
        mod.imports = {k: v for k, v in mod.imports.items() if k in modules and k != mod.name}
    return modules


def circles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in modules[v].imports:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in modules:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    modules = read()
    found = circles(modules)
    reach = [(m.name, t, n, line) for m in modules.values() for t, n, line in m.privates]
    print(f"modules: {len(modules)}, import edges: {sum(len(m.imports) for m in modules.values())}")
    print(f"circles: {len(found)}")
    for comp in found:
        print(f"  {len(comp)} modules: {', '.join(comp)}")
    print(f"private reach-ins: {len(reach)}")
    for src, target, name, line in reach:
        print(f"  {src}:{line} -> {target}.{name}")
    print("largest modules:")
    for m in sorted(modules.values(), key=lambda m: -m.lines)[:8]:
        print(f"  {m.lines:5d} {m.path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
