"""Dependencies point one way (docs/architecture.md, "Dependencies"): the ground floor imports nothing above it,
and no import circle passes through the config. Read from the source with ``ast``, so an import inside a
function counts as much as one at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from b3stream.config import EDGE_MODES, POOLINGS, STRATEGY_NAMES

PACKAGE = Path(__file__).resolve().parents[1] / "b3stream"
FLOOR = {"b3stream.config", "b3stream.errors", "b3stream.st_folder", "b3stream.files", "b3stream.dist",
         "b3stream.progress", "b3stream.records"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The b3stream modules ``node`` (in ``module``) names: ``from .x import y`` is ``x``, or ``x.y`` when
    that is a module itself."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            is_package = MODULES[module].name == "__init__.py"
            base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [target] + [f"{target}.{alias.name}" for alias in node.names]
    return [n for n in names if n in MODULES]


def _imports(module: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # runs when called, not when the module is imported
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.update(_imported(child, module))
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def test_the_parser_sees_relative_and_function_level_imports():
    # the checks below are only as good as this: config's own floor imports, a function-level one elsewhere
    assert {"b3stream.errors", "b3stream.st_folder"} <= _imports("b3stream.config", top_level_only=True)
    assert "b3stream.data.prepare" in _imports("b3stream.cli", top_level_only=False) - \
        _imports("b3stream.cli", top_level_only=True)


def test_the_ground_floor_imports_nothing_above_it():
    assert FLOOR <= set(MODULES)
    above = {m: sorted(_imports(m, top_level_only=False) - FLOOR) for m in sorted(FLOOR)}
    assert {m: names for m, names in above.items() if names} == {}


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "also-in-functions"])
def test_no_import_cycle_passes_through_the_config(top_level_only):
    # also with the imports inside functions: the circle this replaced ran through config's function-level
    # imports of the model folder, the encoder and the mining registries
    graph = {m: _imports(m, top_level_only) for m in MODULES}
    seen, stack = set(), ["b3stream.config"]
    while stack:  # every module the config's imports reach
        for nxt in graph[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    assert "b3stream.config" not in seen, f"config reaches itself through {sorted(seen)}"


def test_the_registries_hold_exactly_the_names_the_config_accepts():
    from b3stream.mining.graph import EDGES
    from b3stream.mining.strategies import STRATEGIES
    from b3stream.model_folder import POOLINGS as folder_poolings

    assert tuple(STRATEGIES) == STRATEGY_NAMES
    assert all(cls.name == name for name, cls in STRATEGIES.items())
    assert EDGES == EDGE_MODES
    assert folder_poolings is POOLINGS
