"""raydyn's module import graph has no cycles, and every module imports on its own.

The graph is static: every ``import`` statement in ``raydyn/**/*.py``, at module level and inside
functions alike (a lazy import is still a dependency), except those under ``if TYPE_CHECKING:``.
:func:`import_graph` is reused to check the import column of ``docs/DESIGN.md``.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raydyn"


def modules() -> dict[str, Path]:
    """Every raydyn module (packages by their ``__init__.py``), by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST):
    """Every Import/ImportFrom below ``node``, skipping the body of ``if TYPE_CHECKING:`` (not its else)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    yield stmt
                yield from _imports(stmt)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _imports(child)


def _owning_module(name: str, known: dict[str, Path]) -> str | None:
    """``name`` itself when it is a module, else its closest enclosing module."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def module_imports(name: str, known: dict[str, Path] | None = None) -> dict[str, list[int]]:
    """The raydyn modules that module ``name`` imports, each with the line numbers of its imports."""
    known = modules() if known is None else known
    path = known[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: dict[str, list[int]] = {}

    def add(target: str | None, line: int) -> None:
        if target is not None and target != name and line not in found.get(target, []):
            found.setdefault(target, []).append(line)

    for node in _imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "raydyn":
                    add(_owning_module(alias.name, known), node.lineno)
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source.split(".")[0] != "raydyn":
            continue
        for alias in node.names:
            target = f"{source}.{alias.name}"
            add(target if target in known else _owning_module(source, known), node.lineno)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the set of raydyn modules it imports (static scan, ``TYPE_CHECKING`` imports left out)."""
    known = modules()
    return {name: set(module_imports(name, known)) for name in known}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (iterative), each sorted, larger than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in graph:
                    continue
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def test_no_import_cycles():
    known = modules()
    lines = {name: module_imports(name, known) for name in known}
    graph = {name: set(targets) for name, targets in lines.items()}
    cycles = strongly_connected(graph)
    report = []
    for component in cycles:
        members = set(component)
        report.append("cycle: " + ", ".join(component))
        for source in component:
            for target in sorted(graph[source] & members):
                where = ", ".join(str(n) for n in lines[source][target])
                report.append(f"    {source} -> {target}  ({known[source].relative_to(ROOT)}:{where})")
    assert not cycles, "import cycles in raydyn/:\n" + "\n".join(report)


def test_scan_resolves_imports():
    """The scan sees function-level and relative imports, resolves ``from pkg import module``, skips TYPE_CHECKING."""
    graph = import_graph()
    assert "raydyn.store.store" in graph["raydyn.store"]  # from raydyn.store.store import ...
    assert "raydyn.errors" in graph["raydyn"]  # from raydyn.errors import RaydynError
    assert "raydyn.store" in graph["raydyn"]  # lazy, inside open_store()
    assert "raydyn.api" in graph["raydyn"]  # from raydyn import api (a module, not the package)
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import raydyn.cli\nelse:\n    import raydyn.spec\n")
    seen = [alias.name for node in _imports(tree) for alias in node.names]
    assert seen == ["TYPE_CHECKING", "raydyn.spec"]


# ------------------------------------------------------------------ docs/DESIGN.md's module table
# Granularity: each row of the table is one *unit*. Its first column names the files it covers, in
# backticks, relative to raydyn/: a module (`spec.py`, `train/population.py`; `__init__.py` is the
# package root), a package (`store/`: every module below it) or a pattern (`jobs/<name>.py`: the
# modules directly in jobs/, not its __init__). A module belongs to the most specific row covering it:
# a named module before a pattern before a package, a deeper package before a shallower one. Every
# module must belong to exactly one row.
# A unit imports the units owning the raydyn modules its modules import (function-level imports
# included, TYPE_CHECKING ones not; imports inside the unit do not count). The imports column lists
# exactly those, comma-separated, in any order, each by one of its row's names without `.py` or the
# trailing `/` (`spec`, `store`, `train/recorder`, `jobs/<name>`, `raydyn` for `__init__.py`); `—` for
# none; words in parentheses are comments; `everything` only where it is literally true (every other
# unit). Units in IMPLICIT are imported anywhere and never listed.
DESIGN = ROOT / "docs" / "DESIGN.md"
IMPLICIT = {"errors": "RaydynError and its subclasses are raised by every layer; listing them says nothing"}
EVERYTHING = "everything"


def _unit_ref(name: str) -> str:
    ref = name.strip().strip("`").strip()
    ref = ref.removesuffix("/").removesuffix(".py")
    if ref == "__init__":
        return "raydyn"
    return ref.removesuffix("/__init__")


def _covers(name: str, path: str) -> tuple[int, int] | None:
    """How specifically table name ``name`` covers module file ``path`` (relative to raydyn/), or None."""
    depth = name.rstrip("/").count("/") + 1
    if "<" in name:
        pattern = re.escape(name).replace(re.escape("<name>"), "[^/]+")
        ok = re.fullmatch(pattern, path) is not None and not path.endswith("__init__.py")
        return (1, depth) if ok else None
    if name.endswith("/"):
        return (0, depth) if path.startswith(name) else None
    return (2, depth) if path == name else None


def design_table() -> list[tuple[int, list[str], str]]:
    """The module table's rows: (line number, names in the first column, the imports column)."""
    rows, inside = [], False
    for number, line in enumerate(DESIGN.read_text().splitlines(), 1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not inside:
            inside = cells[:1] == ["module"] and cells[-1:] == ["imports"]
            continue
        if not line.startswith("|"):
            break
        if set(cells[0]) <= set("-: "):
            continue
        rows.append((number, re.findall(r"`([^`]+)`", cells[0]), cells[-1]))
    return rows


def test_design_table_imports_match_the_code():
    """Every row of docs/DESIGN.md's module table lists exactly the units its modules import."""
    rows = design_table()
    assert len(rows) > 10, f"no module table found in {DESIGN}"
    problems: list[str] = []
    label = {i: ", ".join(f"`{n}`" for n in names) for i, (_, names, _) in enumerate(rows)}
    refs: dict[str, int] = {}
    for i, (_, names, _) in enumerate(rows):
        for name in names:
            ref = _unit_ref(name)
            if ref in refs and refs[ref] != i:
                problems.append(f"{label[i]} and {label[refs[ref]]} are both called {ref!r}")
            refs[ref] = i

    known = modules()
    unit: dict[str, int] = {}
    for module, path in known.items():
        rel = path.relative_to(PACKAGE).as_posix()
        scored = sorted(((score, i) for i, (_, names, _) in enumerate(rows) for n in names
                         if (score := _covers(n, rel)) is not None), reverse=True)
        if not scored:
            problems.append(f"{rel} is in no row of the table")
            continue
        if len(scored) > 1 and scored[0][0] == scored[1][0] and scored[0][1] != scored[1][1]:
            problems.append(f"{rel} is covered equally by {label[scored[0][1]]} and {label[scored[1][1]]}")
        unit[module] = scored[0][1]
    for i, (_, names, _) in enumerate(rows):
        for name in names:
            if not any(_covers(name, p.relative_to(PACKAGE).as_posix()) for p in known.values()):
                problems.append(f"{label[i]}: `{name}` names no module")

    implicit = {refs[r] for r in IMPLICIT if r in refs}
    imports: dict[int, dict[int, str]] = {i: {} for i in range(len(rows))}  # unit -> imported unit -> one edge
    for source, targets in import_graph().items():
        for target in sorted(targets):
            a, b = unit.get(source), unit.get(target)
            if a is not None and b is not None and a != b and b not in implicit:
                imports[a].setdefault(b, f"{source} -> {target}")

    for i, (number, _, column) in enumerate(rows):
        text = re.sub(r"\([^)]*\)", "", column)
        words = [w.strip() for w in text.split(",") if w.strip() not in ("", "—", "-")]
        expected = set(imports[i])
        if words == [EVERYTHING]:
            missing = set(range(len(rows))) - expected - implicit - {i}
            if missing:
                problems.append(f"DESIGN.md:{number} {label[i]} says {EVERYTHING} but imports no "
                                + ", ".join(sorted(label[m] for m in missing)))
            continue
        listed: set[int] = set()
        for word in words:
            ref = _unit_ref(word)
            if ref not in refs:
                problems.append(f"DESIGN.md:{number} {label[i]} lists {word!r}, which is no row's name")
            elif refs[ref] in implicit:
                problems.append(f"DESIGN.md:{number} {label[i]} lists {word!r}, which is never listed "
                                f"({IMPLICIT[ref]})")
            else:
                listed.add(refs[ref])
        for extra in sorted(listed - expected):
            problems.append(f"DESIGN.md:{number} {label[i]} lists {label[extra]} but does not import it")
        for miss in sorted(expected - listed):
            problems.append(f"DESIGN.md:{number} {label[i]} imports {label[miss]} but does not list it "
                            f"({imports[i][miss]})")
    assert not problems, "docs/DESIGN.md's module table disagrees with the code:\n" + "\n".join(problems)


@pytest.mark.slow  # one fresh interpreter per module, most of them importing torch: 1-3 min on 2 busy cores
def test_every_module_imports_on_its_own():
    """Each module imports in a fresh interpreter of its own (no help from modules imported before it)."""

    def attempt(name: str) -> str | None:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            return None
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return f"{name}: {last[0]}"

    names = sorted(modules())
    assert len(names) > 50  # the scan found the package
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        failed = [message for message in pool.map(attempt, names) if message]
    assert not failed, "modules that fail to import on their own:\n" + "\n".join(failed)
