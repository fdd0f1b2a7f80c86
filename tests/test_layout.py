"""The package's architecture, held by a test: stage folders, the dependency rule, no cycles.

Every import is counted, function-level ones included: a cycle hidden inside a function is still a
cycle for the reader, and an import that crosses a stage boundary the wrong way is still a
dependency even when it happens late.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "tsm_edge"

# stage -> the stages it may import (itself always allowed). ``cli`` and the package root may
# import anything; the root only names modules in strings (lazy attributes).
ALLOWED = {
    "errors": set(),
    "support": {"errors"},
    "models": {"errors", "support"},
    "frontend": {"errors", "support", "models"},
    "artifact": {"errors", "support"},
    "data": {"errors", "support"},
    "training": {"errors", "support", "models", "data", "runtime"},
    "runtime": {"errors", "support", "artifact"},
    "device": {"errors", "support", "artifact", "runtime"},
    "compiler": {"errors", "support", "models", "frontend", "artifact", "runtime", "device"},
    "measure": {"errors", "support", "models", "frontend", "artifact", "runtime", "device",
                "data"},
}
STAGES = set(ALLOWED) | {"cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every tsm_edge module ``name`` imports, at any depth of the file."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tsm_edge"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src.split(".")[0] != "tsm_edge":
                continue
            for alias in node.names:  # ``from pkg import module`` imports pkg.module
                sub = f"{src}.{alias.name}"
                found.add(sub if sub in MODULES else src)
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_lives_in_a_stage_folder():
    loose = [m for m in MODULES if m != "tsm_edge" and _stage(m) not in STAGES]
    assert not loose, f"modules outside the stage folders: {loose}"
    flat = [m for m in MODULES if m.count(".") == 1 and m != "tsm_edge.errors"
            and not MODULES[m].name == "__init__.py"]
    assert not flat, f"flat modules beside the stage folders: {flat}"


def test_imports_follow_the_dependency_rule():
    wrong = []
    for module, deps in GRAPH.items():
        stage = _stage(module)
        if stage in (None, "cli"):
            continue
        for dep in deps:
            target = _stage(dep)
            if target is None:  # the package root: __version__ only
                continue
            if target != stage and target not in ALLOWED[stage]:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the stage rule:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    """Tarjan's strongly connected components over every import, function-level included."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in GRAPH[v]:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle_and_a_wrong_way_import():
    """The two tests above would catch what they look for (checked on a made-up graph)."""
    saved = dict(GRAPH)
    try:
        GRAPH["tsm_edge.runtime.session"] = saved["tsm_edge.runtime.session"] | {
            "tsm_edge.compiler.api"}
        GRAPH["tsm_edge.compiler.api"] = saved["tsm_edge.compiler.api"] | {
            "tsm_edge.runtime.session"}
        for check in (test_imports_follow_the_dependency_rule, test_no_import_cycles):
            try:
                check()
            except AssertionError:
                continue
            raise AssertionError(f"{check.__name__} missed the planted import")
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_no_private_name_crosses_modules():
    """``from x import _name`` reaches into another module's internals."""
    crossing = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                    "tsm_edge")):
                crossing += [f"{module}: {a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert not crossing, crossing


def test_the_package_ships_the_runtime_and_what_it_imports():
    """A package carries the runtime stage and its imports' closure, nothing compile-side."""
    from tsm_edge.artifact.package import RUNTIME_PARTS

    shipped = {m for m in MODULES if _stage(m) in {p.removesuffix(".py") for p in RUNTIME_PARTS}}
    need, todo = set(), ["tsm_edge.runtime.package_runner"]
    while todo:
        m = todo.pop()
        if m in need:
            continue
        need.add(m)
        todo += GRAPH[m]
    assert need - {"tsm_edge"} <= shipped, sorted(need - shipped)
    assert not any(_stage(m) in {"compiler", "frontend", "models", "measure"} for m in shipped)


def test_every_package_folder_is_in_the_wheel():
    import tomllib

    listed = set(tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    folders = {".".join(p.parent.relative_to(PKG.parent).parts) for p in PKG.rglob("__init__.py")}
    assert folders <= listed, f"not in pyproject's packages: {sorted(folders - listed)}"
