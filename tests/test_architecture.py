"""The shape of the code: imports go one way, modules stay small, the slot table is the one source,
`optiflow --help` imports no heavy library."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"optiflow": ROOT / "optiflow", "optiflow_plugins": ROOT / "plugins"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Every module of the core and the built-in plugins by dotted name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body, inside functions included."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles_counting_imports_inside_functions():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_at_most_400_lines(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_low_level_modules_import_nothing_above_them():
    graph = import_graph()
    assert graph["optiflow.errors"] == set()
    assert graph["optiflow.slots"] == set()
    assert {name for name, targets in graph.items() if "optiflow.cli" in targets} == {"optiflow.__main__"}
    assert not {t for t in graph["optiflow.plugins"] if t.startswith("optiflow.commands")}


def test_plan_imports_no_torch():
    source = (ROOT / "optiflow" / "plan.py").read_text()
    names = {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))
             for alias in node.names} | {node.module for node in ast.walk(ast.parse(source))
                                         if isinstance(node, ast.ImportFrom) and node.module}
    assert not {n for n in names if n and n.split(".")[0] == "torch"}


def test_every_slot_is_a_config_key_a_plan_field_a_cli_flag_and_a_search_target():
    from optiflow.cli import train
    from optiflow.config import RunConfig
    from optiflow.plan import Plan
    from optiflow.slots import SLOTS

    keys = [slot.key for slot in SLOTS]
    assert set(keys) <= {f.name for f in dataclasses.fields(RunConfig)}
    assert [f.name for f in dataclasses.fields(Plan)] == ["config", *keys]
    flags = {opt for param in train.params for opt in param.opts}
    assert {f"--{key}" for key in keys} <= flags
    repeatable = {param.name for param in train.params if getattr(param, "multiple", False)}
    assert {slot.key for slot in SLOTS if slot.repeatable} <= repeatable


def test_every_family_has_its_registration_hook():
    from optiflow import hookspecs
    from optiflow.slots import FAMILIES, KINDS

    for family in FAMILIES:
        assert callable(getattr(hookspecs, family.hook))
    assert len(KINDS) == len(set(KINDS))


def test_slot_defaults_are_the_config_defaults():
    from optiflow.config import RunConfig
    from optiflow.slots import SLOTS

    config = RunConfig()
    for slot in SLOTS:
        value = getattr(config, slot.key)
        if slot.repeatable:
            assert value == []
        elif slot.default is None:
            assert value is None
        else:
            assert value.name == slot.default


def test_help_does_not_import_torch_or_mlflow():
    import subprocess
    import sys

    code = (
        "import sys\nfrom optiflow.cli import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'mlflow', 'optuna', 'sklearn') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage: " in out and "train" in out, "the help was printed"
    assert "HEAVY []" in out
