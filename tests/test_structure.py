"""The shape of the code base: cax's modules import each other without cycles, and the module map
in docs/design.rst names every module.

An import cycle is hidden when one side imports late (inside a function) or through a proxy; it
still ties the two modules together, and it breaks as soon as someone moves the import to the top.
So the graph below counts every import statement, wherever it is, and importing ``a.b.c`` counts as
importing ``a`` and ``a.b`` too (Python runs their ``__init__`` first).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cax"
DESIGN = ROOT / "docs" / "design.rst"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def cax_modules() -> dict:
    """Module name -> file, for every ``.py`` file under cax/."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: dict) -> set:
    """The cax modules that ``path`` imports anywhere (module level, functions, branches)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                # `from cax import logs` imports the module cax.logs; `from cax.x import f`, cax.x
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    # importing a.b.c runs a and a.b first -- except the packages ``path`` itself lies in, which
    # Python has already begun (a sibling import inside a package is no edge to its __init__)
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    for target in list(found):
        parts = target.split(".")
        found.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts)))
                     if p not in own)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict:
    modules = cax_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def find_cycle(graph: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}  # 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cax_imports_form_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_late_and_package_imports():
    """The cycle finder would miss what it cannot see: check it on the cases that hid cycles."""
    graph = import_graph()
    assert "cax.runsdb" in graph["cax.cli"]  # imported inside functions only
    # from outside a package, `cax.tasks.base` runs cax/tasks/__init__.py first: an edge to it;
    # from inside, the package has begun already (cax.runsdb.lifecycle -> cax.runsdb.clock)
    assert "cax.tasks" in graph["cax.config"] or "cax.tasks" in graph["cax.cli"]
    assert "cax.runsdb" not in graph["cax.runsdb.lifecycle"]
    assert "cax.runsdb.clock" in graph["cax.runsdb.lifecycle"]
    assert "cax.admin" in graph["cax.cli"]  # `from cax import admin`: the module, not the package
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# ---- the module map ---------------------------------------------------------------------------

def module_map() -> dict:
    """``cax/...py`` -> its line in the "Modules" table of docs/design.rst."""
    text = DESIGN.read_text()
    section = re.search(r"^Modules\n-+\n(.*?)(?=^\S[^\n]*\n[-=~^]{3,}\n)", text, re.S | re.M)
    assert section, "docs/design.rst has no 'Modules' section"
    named = {}
    for line in section.group(1).splitlines():
        m = re.match(r"``(cax/\S+\.py)``\s+(\S.*)", line)
        if m:
            named[m.group(1)] = m.group(2)
    return named


def test_module_map_names_every_module():
    named = module_map()
    files = {p.relative_to(ROOT).as_posix() for p in cax_modules().values()}
    missing = sorted(files - set(named))
    stale = sorted(set(named) - files)
    assert not missing, ("docs/design.rst 'Modules' lacks a line for: " + ", ".join(missing)
                         + " (add ``<path>``  <why it exists>)")
    assert not stale, ("docs/design.rst 'Modules' names modules that do not exist: "
                       + ", ".join(stale))
    short = [f for f, why in named.items() if len(why.split()) < 3]
    assert not short, f"say why these modules exist: {', '.join(short)}"


# ---- one way to wait --------------------------------------------------------------------------

#: sleeps that are no wait for a condition: the one that watches a job *stay* pending
SLEEP_ALLOWED = {"tests/waiting.py",
                 "tests/test_batch_backends.py:test_local_max_jobs_keeps_others_pending"}


def _sleeps_and_binds(path: Path):
    """(where, what) for every ``time.sleep(...)`` call and every bind to port 0 in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(ROOT).as_posix()
    found = []
    for func in [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        where = rel if func is tree else f"{rel}:{func.name}"
        body = func.body if func is not tree else [
            n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        for node in (n for stmt in body for n in ast.walk(stmt)):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if node.func.attr == "sleep" and getattr(node.func.value, "id", None) == "time":
                found.append((where, "time.sleep"))
            elif node.func.attr == "bind" and node.args and isinstance(node.args[0], ast.Tuple) \
                    and getattr(node.args[0].elts[-1], "value", None) == 0:
                found.append((where, "bind to port 0"))
    return found


def test_tests_wait_and_pick_ports_through_tests_waiting():
    """One poll loop and one free-port helper (tests/waiting.py) for the suite and benchmarks."""
    files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    found = sorted({(w, what) for p in files for w, what in _sleeps_and_binds(p)
                    if p.relative_to(ROOT).as_posix() != "tests/waiting.py"
                    and w not in SLEEP_ALLOWED})
    assert not found, ("poll loops or free ports outside tests/waiting.py (use wait_for / "
                       "free_port): " + ", ".join(f"{w} ({what})" for w, what in found))
