"""The package's layout holds: two sides with one door each, no circles, small modules.

Read from the source with ``ast`` (nothing is imported), so a change that breaks the layout
fails here with the module and the import that broke it, whatever the tests exercise.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nbtool"
TESTS = Path(__file__).resolve().parent
#: A module longer than this holds more than one idea. Issue 25 withdrew the 400-line cap
#: (it split modules by line count, not by idea) for one idea per module and a soft limit
#: of about 600 lines.
MAX_LINES = 600
#: Imported by both sides: they import nothing above them.
SHARED = {"nbtool.wire", "nbtool.errors", "nbtool._util.quiet"}
#: The face: what the user touches. It reaches workers and the cluster only via the engine.
FACE = {"nbtool.notebook.magics", "nbtool.notebook.magic_args", "nbtool.notebook.dashboard.panel", "nbtool.notebook.dashboard.runs",
        "nbtool.notebook.dashboard.devices", "nbtool.notebook.progress", "nbtool.notebook.background"}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """The nbtool modules ``name`` imports anywhere in its file (lazy imports count too:
    a circle hidden in a function is still a circle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nbtool"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("nbtool"):
                continue
            # "from . import overlap" names a module; "from .x import y" names x.
            known = modules()
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports_of(name, path) if m in known and m != "nbtool"}
            for name, path in known.items()}


def test_no_module_is_longer_than_about_600_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concern (lines): {long}"


def test_no_import_circles_even_through_lazy_imports():
    g = graph()
    circles = []

    def visit(node, stack, on_stack, done):
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(g[node]):
            if nxt in on_stack:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    done: set[str] = set()
    for name in sorted(g):
        if name not in done:
            visit(name, [], set(), done)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_worker_code_imports_only_the_shared_modules_and_itself():
    bad = {name: sorted(m for m in deps if m not in SHARED and not m.startswith("nbtool.worker"))
           for name, deps in graph().items() if name.startswith("nbtool.worker")}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"worker code importing kernel code: {bad}"


def test_the_kernel_reaches_worker_code_only_through_the_door():
    bad = {name: sorted(m for m in deps if m.startswith("nbtool.worker."))
           for name, deps in graph().items() if not name.startswith("nbtool.worker")}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"import these from nbtool.worker (the door) instead: {bad}"


def test_the_shared_modules_import_nothing_above_them():
    g = graph()
    bad = {name: sorted(g[name] - SHARED) for name in SHARED if g[name] - SHARED}
    assert not bad, f"shared modules importing upwards: {bad}"


def test_the_face_reaches_workers_and_the_cluster_only_through_the_engine():
    g = graph()
    bad = {name: sorted(m for m in g.get(name, ()) if m.startswith("nbtool.worker")
                        or m in ("nbtool.engine.cluster", "nbtool.engine.pool", "nbtool.predict.run"))
           for name in FACE}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"the face reaching past the engine: {bad}"
    assert "nbtool.engine.engine" not in g["nbtool.notebook.dashboard.panel"], "the dashboard is handed an engine"


def test_every_module_says_first_what_it_owns():
    missing = [name for name, path in modules().items()
               if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()]
    assert not missing, f"modules without a docstring: {missing}"


#: Names that start with "_" and are public protocols, not private reaches.
PROTOCOLS = re.compile(r"_repr_\w+_|_ipython_\w+_|_asdict|_replace|_fields|_getframe|_exit")


def test_tests_use_only_public_names_of_nbtool():
    reaches = []
    for path in sorted(TESTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nbtool"):
                reaches += [f"{path.name}:{node.lineno} from {node.module} import {a.name}"
                            for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and not PROTOCOLS.fullmatch(node.attr):
                reaches.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not reaches, "tests reaching private names:\n" + "\n".join(reaches)
