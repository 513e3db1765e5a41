"""The package's layout rules, read from the source with `ast` (no module is imported):

- no import cycle between lowvram_grpo's modules;
- the engine never imports the app: nothing outside `lowvram_grpo.app` imports it, but the
  CLI's `ui` command, which launches it from inside its function.

Every import statement counts, at module level or inside a function: an import deferred into a
function (to keep start-up fast, or to avoid loading torch) is still a dependency, and a cycle
held together by one is the tangle these rules are here to prevent. Imports under
`if TYPE_CHECKING:` do not run and do not count. Importing `a.b.c` also runs the packages
`a.b` and `a` (their `__init__`), so it counts as importing them too, unless the importer is
inside them.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "lowvram_grpo"
README = PACKAGE_DIR.parent / "README.md"
APP = "lowvram_grpo.app"
# The one way in from outside: `lowvram-grpo ui` launches the app (a deferred import).
APP_ENTRY_POINTS = {("lowvram_grpo.cli", "lowvram_grpo.app.ui")}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    deferred: bool  # inside a function, so it runs when called, not when the module loads


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module and package under `package_dir`."""
    root = package_dir.name
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [root, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module):
    """(node, deferred) for every import statement that can run."""
    def walk(node, deferred):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from walk(ast.Module(body=[sub], type_ignores=[]), deferred)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, deferred
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inner)
    yield from walk(tree, False)


def imports(package_dir: Path) -> list[Import]:
    """Every import of one of the package's own modules, resolved to the module it loads."""
    modules = module_names(package_dir)
    found = []
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, deferred in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the importer's package, `level` steps up
                    anchor = importer.split(".")
                    anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import name` loads the submodule pkg.name when there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target.split(".")[0] != package_dir.name:
                    continue
                while target not in modules:  # `import pkg.mod.attr`-style: the module part
                    target = target.rpartition(".")[0]
                # Loading a.b.c runs a.b and a first: those count, unless the importer is inside them.
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    loaded = ".".join(parts[:i])
                    inside = importer == loaded or importer.startswith(loaded + ".")
                    if loaded in modules and not inside:
                        found.append(Import(importer, loaded, node.lineno, deferred))
    return found


def import_cycles(found: list[Import]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        graph.setdefault(imp.importer, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def _describe(cycle: list[str], found: list[Import]) -> str:
    members = set(cycle)
    edges = [f"  {i.importer} -> {i.target} (line {i.line}{', in a function' if i.deferred else ''})"
             for i in found if i.importer in members and i.target in members]
    return "import cycle between " + ", ".join(cycle) + ":\n" + "\n".join(sorted(set(edges)))


def app_imports_from_outside(found: list[Import], app: str = APP, allowed=APP_ENTRY_POINTS) -> list[Import]:
    """Imports of the app package from a module outside it, but the allowed deferred entry points
    (and the app package itself, which loading an allowed module runs)."""
    allowed_targets = {}
    for importer, target in allowed:
        parts = target.split(".")
        allowed_targets.setdefault(importer, set()).update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    bad = []
    for imp in found:
        in_app = imp.importer == app or imp.importer.startswith(app + ".")
        to_app = imp.target == app or imp.target.startswith(app + ".")
        if to_app and not in_app and not (imp.deferred and imp.target in allowed_targets.get(imp.importer, ())):
            bad.append(imp)
    return bad


# --------------------------------------------------------------------------------------------
# The rules, on lowvram_grpo
# --------------------------------------------------------------------------------------------


def test_the_checker_sees_the_package():
    """Guards against a vacuous pass: the graph holds the imports we know are there."""
    found = imports(PACKAGE_DIR)
    edges = {(i.importer, i.target) for i in found}
    assert ("lowvram_grpo.trainer", "lowvram_grpo.rewards.scoring") in edges
    assert ("lowvram_grpo.trainer", "lowvram_grpo.rewards") in edges  # the package, run on the way
    assert ("lowvram_grpo.cli", "lowvram_grpo.app.ui") in edges
    assert len(module_names(PACKAGE_DIR)) > 40


def test_no_import_cycle():
    found = imports(PACKAGE_DIR)
    cycles = import_cycles(found)
    assert not cycles, "\n\n".join(_describe(c, found) for c in cycles)


def test_the_run_directory_module_needs_only_the_config():
    """rundir.py owns every file name of the contract between engine and front ends, so the
    front ends read a run without loading the engine (checkpoint.py imports rundir, not back)."""
    targets = {i.target for i in imports(PACKAGE_DIR) if i.importer == "lowvram_grpo.rundir"}
    assert targets <= {"lowvram_grpo.config"}


def test_the_readme_layout_table_names_every_module():
    """The README's Layout table is the tree: every module in it, and nothing that is not."""
    section = README.read_text(encoding="utf-8").split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([^`]+)`", row)}
    on_disk = {str(p.relative_to(PACKAGE_DIR)) for p in PACKAGE_DIR.rglob("*") if p.suffix in (".py", ".js")
               and p.name != "__init__.py" and "__pycache__" not in p.parts}
    assert len(on_disk) > 40
    assert sorted(on_disk - named) == [], "modules the README's Layout table does not name"
    assert sorted(named - on_disk) == [], "names in the README's Layout table that are not modules"


def test_the_engine_never_imports_the_app():
    bad = app_imports_from_outside(imports(PACKAGE_DIR))
    assert not bad, "\n".join(f"{i.importer} imports {i.target} (line {i.line})" for i in bad)


# --------------------------------------------------------------------------------------------
# The checker itself, on a planted package
# --------------------------------------------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_a_planted_cycle_is_found_even_through_a_deferred_import(tmp_path):
    root = _package(tmp_path, {
        "a.py": "from pkg.b import thing\n",
        "b.py": "def thing():\n    from pkg import c\n",
        "c.py": "import pkg.a\n",
        "d.py": "from pkg.a import x\n",  # imports into the cycle, but is not in it
    })
    found = imports(root)
    assert import_cycles(found) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert "pkg.b -> pkg.c (line 2, in a function)" in _describe(["pkg.a", "pkg.b", "pkg.c"], found)


def test_a_package_init_that_imports_its_importer_is_a_cycle(tmp_path):
    """`from pkg.sub.x import y` runs pkg/sub/__init__.py, which here imports the importer."""
    root = _package(tmp_path, {
        "sub/__init__.py": "from pkg.user import z\n",
        "sub/x.py": "y = 1\n",
        "user.py": "from pkg.sub.x import y\nz = 2\n",
    })
    assert import_cycles(imports(root)) == [["pkg.sub", "pkg.user"]]


def test_relative_imports_and_type_checking_blocks(tmp_path):
    root = _package(tmp_path, {
        "sub/__init__.py": "",
        "sub/a.py": "from . import b\nfrom ..top import t\n",
        "sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import a\n",
        "top.py": "t = 1\n",
    })
    edges = {(i.importer, i.target) for i in imports(root)}
    assert edges == {("pkg.sub.a", "pkg.sub.b"), ("pkg.sub.a", "pkg.top")}
    assert import_cycles(imports(root)) == []


def test_an_engine_module_importing_the_app_is_caught(tmp_path):
    root = _package(tmp_path, {
        "app/__init__.py": "",
        "app/ui.py": "from pkg import engine\n",
        "engine.py": "x = 1\n",
        "cli.py": "def ui():\n    from pkg.app.ui import launch\n",
        "eager_cli.py": "from pkg.app.ui import launch\n",
        "trainer.py": "def f():\n    from pkg.app import ui\n",
    })
    allowed = {("pkg.cli", "pkg.app.ui"), ("pkg.eager_cli", "pkg.app.ui")}
    bad = {(i.importer, i.target) for i in app_imports_from_outside(imports(root), "pkg.app", allowed)}
    # The deferred launcher is fine; the same import at module level and any other module are not.
    assert bad == {("pkg.eager_cli", "pkg.app"), ("pkg.eager_cli", "pkg.app.ui"),
                   ("pkg.trainer", "pkg.app"), ("pkg.trainer", "pkg.app.ui")}
