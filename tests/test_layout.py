"""The package's layout holds: subpackages reached through their doors, two sides (kernel
and worker) that meet only in the shared modules, no circles, one meaning per word.

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
#: Imported by both sides (kernel and workers): they import nothing above them. ``_util``
#: is a subpackage of small helpers; ``preprocess`` is kernel code that runs on workers.
SHARED_PREFIXES = ("nbtool.wire", "nbtool.signature", "nbtool.errors", "nbtool.preprocess",
                   "nbtool._util")
#: The face: what the user touches. It reaches models, runs and workers only via the engine.
FACE_PREFIXES = ("nbtool.notebook", "nbtool.views")
#: What may stand loose at the top: the public API and the shared modules (issue 25: about
#: 8 at most).
TOP_LEVEL = {"nbtool", "nbtool.errors", "nbtool.wire", "nbtool.signature", "nbtool.preprocess",
             "nbtool.tables"}


def shared(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in SHARED_PREFIXES)


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
    bad = {name: sorted(m for m in deps if not shared(m) and not m.startswith("nbtool.worker"))
           for name, deps in graph().items() if name.startswith("nbtool.worker")}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"worker code importing kernel code: {bad}"


def test_the_kernel_reaches_worker_code_only_through_the_door():
    bad = {name: sorted(m for m in deps if m.startswith("nbtool.worker."))
           for name, deps in graph().items() if not name.startswith("nbtool.worker")}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"import these from nbtool.worker (the door) instead: {bad}"


def test_the_shared_modules_import_nothing_above_them():
    bad = {name: sorted(m for m in deps if not shared(m))
           for name, deps in graph().items() if shared(name)}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"shared modules importing upwards: {bad}"


def test_the_face_reaches_models_runs_and_workers_only_through_the_engine():
    past = ("nbtool.worker", "nbtool.catalog", "nbtool.prediction")
    bad = {name: sorted(m for m in deps if m.startswith(past))
           for name, deps in graph().items() if name.startswith(FACE_PREFIXES)}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"the face reaching past the engine: {bad}"
    dashboard = {m for name, deps in graph().items() if name.startswith("nbtool.views")
                 for m in deps}
    assert not any(m.startswith("nbtool.engine") for m in dashboard), \
        "the dashboard is handed an engine; it never imports one"


def packages() -> set[str]:
    return {name for name, path in modules().items() if path.name == "__init__.py"}


def test_a_module_outside_a_subpackage_imports_only_its_door():
    """``nbtool.prediction.runs`` may import ``nbtool.catalog`` (the door) but not
    ``nbtool.catalog.loads``; inside a subpackage, modules import each other directly."""
    bad = []
    for name, deps in graph().items():
        for target in deps:
            home = target.rpartition(".")[0]        # the package the target sits in
            if home != "nbtool" and not name.startswith(home + ".") and name != home:
                bad.append(f"{name} -> {target} (import it from {door_for(name, target)})")
    assert not bad, "imports past a door:\n" + "\n".join(sorted(bad))


def door_for(importer: str, target: str) -> str:
    """The door ``importer`` should use for ``target``: its outermost package that does
    not hold the importer."""
    parts = target.split(".")
    for i in range(2, len(parts)):
        if not importer.startswith(".".join(parts[:i]) + "."):
            return ".".join(parts[:i])
    return target


def test_every_door_says_what_its_room_is_for_and_lists_its_interface():
    for name in packages():
        tree = ast.parse(modules()[name].read_text())
        doc = ast.get_docstring(tree) or ""
        assert len(doc.split()) > 15, f"{name}: the door's docstring should say what the room holds"
        names = [t.id for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)]
        assert "__all__" in names, f"{name}: the door lists its interface in __all__"


def test_only_the_public_api_and_the_shared_modules_stand_at_the_top():
    loose = {name for name in modules() if name.count(".") == 1 and name not in packages()}
    assert loose <= TOP_LEVEL, f"put these in a subpackage: {sorted(loose - TOP_LEVEL)}"
    assert len(TOP_LEVEL) <= 8


def test_one_meaning_per_word_in_module_names():
    """"runtime" is only TensorFlow/OpenVINO/LiteRT (``worker.runtimes``); "cache" only the
    worker's model cache (``worker.model_cache``)."""
    names = set(modules())
    assert {n for n in names if "runtime" in n} <= {n for n in names
                                                    if n.startswith("nbtool.worker.runtimes")}
    assert {n for n in names if "cache" in n} == {"nbtool.worker.model_cache"}


def test_tests_import_the_module_they_test_not_a_door():
    """A test names the module whose behaviour it checks (``nbtool.prediction.runs``), so a
    failure points at the room; the top-level ``nbtool`` API is what users import."""
    doors = packages() - {"nbtool"}
    reaches = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in doors:
                reaches.append(f"{path.name}:{node.lineno} from {node.module} import ...")
    assert not reaches, "import from the defining module instead:\n" + "\n".join(reaches)


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


def test_no_room_shadows_a_public_name():
    """``nbtool.predict(...)`` is a shortcut: a subpackage named ``predict`` would replace
    it the moment it is imported (Python sets a package's submodules as its attributes)."""
    import nbtool

    rooms = {name.split(".")[1] for name in modules() if name.count(".") >= 1}
    shadowed = (rooms & set(nbtool.__all__)) - {"errors"}
    assert not shadowed, f"rename these rooms, they hide public names: {sorted(shadowed)}"
