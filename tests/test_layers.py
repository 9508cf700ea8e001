"""The layers point one way (docs/DESIGN.md): cli/commands -> engine/bench -> loaders/models -> base.

Every module under loaders/, models/, engine/ and bench/ is parsed (not imported) and each import in
it is checked, at module level and inside functions alike (a lazy import is still a dependency),
including `importlib.import_module("...")` with a literal name."""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"loaders": "hamengine.loaders", "models": "hamengine.models", "engine": "hamengine.engine",
            "bench": "hamengine.bench"}
COMMAND_LINE = ("hamengine.commands", "hamengine.cli")
FORBIDDEN = {  # folder -> what none of its modules may import
    "loaders": ("hamengine.engine", "hamengine.bench", *COMMAND_LINE, "hamengine.models"),
    "models": ("hamengine.engine", "hamengine.bench", *COMMAND_LINE, "hamengine.loaders"),
    "engine": COMMAND_LINE,
    "bench": COMMAND_LINE,
}
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository
    line: int
    target: str  # absolute dotted name


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(REPO).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(path: Path) -> list[Import]:
    """Every name `path` imports, as absolute dotted names (`from a import b` gives a and a.b: b may
    be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module, is_package = module_name(path), path.name == "__init__.py"
    rel = str(path.relative_to(REPO))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            found.append(Import(rel, node.lineno, base))
            found += [Import(rel, node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found.append(Import(rel, node.lineno, node.args[0].value))
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _within(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def layer_violations(folder: str) -> list[str]:
    """One line per offending import statement, naming the shortest forbidden name it imports."""
    worst: dict[tuple[str, int], str] = {}
    for path in _modules(folder):
        for imp in imports_of(path):
            if any(_within(imp.target, bad) for bad in FORBIDDEN[folder]):
                key = (imp.file, imp.line)
                worst[key] = min(worst.get(key, imp.target), imp.target, key=len)
    return [f"{file}:{line} imports {target}" for (file, line), target in sorted(worst.items())]


def test_the_walk_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: a function-level import, a relative import and import_module are found."""
    pkg = tmp_path / "loaders"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        "import os\n"
        "from . import records\n"
        "def f():\n"
        "    from hamengine.engine.runtime.run import RunDir\n"
        "    import importlib\n"
        "    return importlib.import_module('hamengine.cli')\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    targets = {i.target for i in imports_of(pkg / "mod.py")}
    assert {"os", "hamengine.loaders", "hamengine.loaders.records", "hamengine.engine.runtime.run",
            "hamengine.engine.runtime.run.RunDir", "hamengine.cli"} <= targets
    assert layer_violations("loaders") == ["loaders/mod.py:4 imports hamengine.engine.runtime.run",
                                           "loaders/mod.py:6 imports hamengine.cli"]


@pytest.mark.parametrize("folder", list(FORBIDDEN))
def test_layers_point_one_way(folder):
    assert _modules(folder), f"no modules found under {folder}/"
    problems = layer_violations(folder)
    assert not problems, (f"{folder}/ may not import {', '.join(FORBIDDEN[folder])}:\n  "
                          + "\n  ".join(problems))


def long_functions(folder: str, limit: int) -> list[str]:
    found = []
    for path in _modules(folder):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - start + 1
                if lines > limit:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    return found


def test_no_engine_function_over_80_lines():
    problems = long_functions("engine", MAX_FUNCTION_LINES)
    assert not problems, f"functions in engine/ over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(problems)


def test_a_wheel_holds_every_package():
    """setup.cfg lists packages by hand (the folders map into hamengine.*): a package missing there
    works in an editable checkout but is absent from a wheel (`pip install .`), so the CLI breaks."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    roots = {"hamengine": "hamengine", **PACKAGES}
    found = set()
    for folder, dotted in roots.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((dotted, *rel)))
    assert found - listed == set(), f"add to setup.cfg [options] packages: {sorted(found - listed)}"


# Inside loaders/ and engine/: each subpackage imports only the subpackages after it in this list
# (and nothing of its folder's top-level modules, build.py / demo.py, which sit above them all).
SUBPACKAGE_ORDER = {
    "loaders": ("ffcv", "kinds", "pack", "ingest"),
    "engine": ("serve", "train", "evaluate", "runtime"),
}


def subpackage_violations(folder: str) -> list[str]:
    order = SUBPACKAGE_ORDER[folder]
    dotted = PACKAGES[folder]
    problems = []
    for path in _modules(folder):
        parts = path.relative_to(REPO / folder).parts
        if len(parts) < 2:
            continue  # a top-level module of the folder: it may import any subpackage
        rank = order.index(parts[0])
        for imp in imports_of(path):
            if not imp.target.startswith(dotted + "."):
                continue
            head = imp.target[len(dotted) + 1:].split(".")[0]
            allowed = head in order[rank:]
            if not allowed and (head in order or (REPO / folder / f"{head}.py").exists()):
                problems.append(f"{imp.file}:{imp.line} imports {imp.target}")
    return sorted(set(problems))


@pytest.mark.parametrize("folder", list(SUBPACKAGE_ORDER))
def test_subpackages_point_one_way(folder):
    found = {p.parent.name for p in (REPO / folder).glob("*/__init__.py")}
    assert found == set(SUBPACKAGE_ORDER[folder]), f"{folder}/ subpackages: {sorted(found)}"
    problems = subpackage_violations(folder)
    assert not problems, (f"{folder}/: a subpackage imports one listed before it in "
                          f"{SUBPACKAGE_ORDER[folder]} or a top-level module:\n  " + "\n  ".join(problems))


@pytest.mark.parametrize("folder", list(SUBPACKAGE_ORDER))
def test_no_room_holds_more_than_twelve_modules(folder):
    for room in [REPO / folder, *(p.parent for p in (REPO / folder).glob("*/__init__.py"))]:
        modules = [p for p in room.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 12, f"{room.relative_to(REPO)}/ holds {len(modules)} modules: split it by concern"
