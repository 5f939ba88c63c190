"""The plugin manager (optiflow/plugins.py): plugins found by entry point, broken ones isolated, strict mode,
load/disable switches, plugin commands, hook tracing, and `optiflow plugins`, its view on the command line."""

from __future__ import annotations

import json
import re
import shlex
import sys
import textwrap
from pathlib import Path

import pytest

from optiflow import hookimpl, plugins
from optiflow.errors import OptiflowError
from optiflow.plugins import PluginManager, build_registry
from optiflow.registry import Registry
from optiflow.slots import KINDS

from helpers import run_cli, runs_of

GOOD_PLUGIN = """
from optiflow import hookimpl


@hookimpl
def optiflow_register_optimizers(register):
    register("{prefix}-sgd", sgd)


def sgd(model, *, lr: float = 0.05):
    '''Plain SGD from a third-party plugin.'''
    import torch

    return torch.optim.SGD(model.parameters(), lr=lr)
"""

BROKEN_PLUGINS = {
    "import-error": ("import optiflow_no_such_dependency\n", "ModuleNotFoundError: No module named"),
    "hook-exception": (
        """
        from optiflow import hookimpl

        @hookimpl
        def optiflow_register_optimizers(register):
            register("half-registered", lambda model, *, lr=0.1: None)
            raise RuntimeError("the plugin's registration blew up")
        """,
        "raised in optiflow_register_optimizers: RuntimeError: the plugin's registration blew up",
    ),
    "duplicate-name": (
        """
        from optiflow import hookimpl

        @hookimpl
        def optiflow_register_optimizers(register):
            register("half-registered", lambda model, *, lr=0.1: None)
            register("half_registered", lambda model, *, lr=0.1: None, aliases=["half-registered"])
        """,
        "duplicate optimizer 'half-registered': registered twice by plugin 'broken'",
    ),
    "unknown-hook": (
        """
        from optiflow import hookimpl

        @hookimpl
        def optiflow_register_optimizers(register):
            register("half-registered", lambda model, *, lr=0.1: None)

        @hookimpl
        def optiflow_epoch_ends(run, epoch, metrics):
            pass
        """,
        "implements unknown hook 'optiflow_epoch_ends'",
    ),
}


def sample(ctx, *, rate: float = 0.1):
    """A component that plugins registered in code register under any kind."""
    return rate


class FakeSite:
    """A folder on sys.path holding installed distributions (``*.dist-info``) with ``optiflow`` entry points."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.modules: list[str] = []

    def install(self, distribution: str, entry_point: str, source: str, version: str = "0.1",
                module: str | None = None) -> None:
        module = module or f"{distribution.replace('-', '_')}_plugin"
        (self.path / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.path / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[optiflow]\n{entry_point} = {module}\n")
        self.modules.append(module)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Plugins 'installed' for this test only, with a plugin manager that is rebuilt to see them."""
    fake = FakeSite(tmp_path / "site")
    fake.path.mkdir()
    monkeypatch.syspath_prepend(str(fake.path))
    for variable in ("OPTIFLOW_LOAD_PLUGINS", "OPTIFLOW_DISABLE_PLUGINS", "OPTIFLOW_STRICT_PLUGINS",
                     "OPTIFLOW_TRACE_HOOKS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(plugins, "_manager", None)
    monkeypatch.setattr(plugins, "_disabled_by_cli", frozenset())
    yield fake
    for module in fake.modules:
        sys.modules.pop(module, None)


def warnings_in(stderr: str) -> list[str]:
    """The lines of stderr, less MLflow's own INFO logging (it announces creating a new store)."""
    return [line for line in stderr.splitlines() if line.strip() and not re.match(r"[\d/: ]+INFO ", line)]


@pytest.mark.parametrize("kind", BROKEN_PLUGINS)
def test_broken_plugin_is_one_warning_and_training_still_works(kind, site, invoke):
    source, error = BROKEN_PLUGINS[kind]
    site.install("optiflow-broken", "broken", source)
    site.install("optiflow-good", "good", GOOD_PLUGIN.format(prefix="good"))

    result = invoke("train", "--epochs", "1", "--opt", "good-sgd", "-q")
    assert result.exit_code == 0, result.output
    lines = warnings_in(result.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("Warning: plugin 'broken' (optiflow-broken 0.1) skipped: ")
    assert error in lines[0]

    listing = invoke("list", "optimizer").output
    assert "good-sgd" in listing and "adam" in listing
    assert "half-registered" not in listing, "a rejected plugin's partial registrations must be removed"
    assert "half-registered" not in plugins.get_registry().names("optimizer")
    assert plugins.get_plugin_manager().get_plugin("broken") is None, "its lifecycle hooks must not fire either"
    rows = {row["name"]: row for row in json.loads(invoke("plugins", "--json").output)}
    assert rows["broken"]["status"] == "failed" and error in rows["broken"]["error"]
    assert rows["good"]["status"] == "loaded"


@pytest.mark.parametrize("kind", BROKEN_PLUGINS)
def test_strict_mode_turns_a_broken_plugin_into_one_error_line(kind, site, invoke, mlflow_client, experiment,
                                                               monkeypatch):
    source, error = BROKEN_PLUGINS[kind]
    site.install("optiflow-broken", "broken", source)
    monkeypatch.setenv("OPTIFLOW_STRICT_PLUGINS", "1")

    result = invoke("train", "--epochs", "1", "-q")
    assert result.exit_code == 2
    lines = warnings_in(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith("Error: plugin 'broken' (optiflow-broken 0.1) is broken: ")
    assert error in lines[0] and "OPTIFLOW_STRICT_PLUGINS" in lines[0]
    assert mlflow_client.get_experiment_by_name(experiment) is None, "no MLflow run may be left behind"


def test_broken_plugin_in_a_real_process_warns_on_one_line(tmp_path):
    site = FakeSite(tmp_path)
    site.install("optiflow-broken", "broken", BROKEN_PLUGINS["import-error"][0])
    env = {"PYTHONPATH": str(tmp_path), "OPTIFLOW_STRICT_PLUGINS": ""}

    listed = run_cli("list", "optimizer", cwd=tmp_path, env=env)
    assert listed.returncode == 0 and "adam" in listed.stdout
    assert warnings_in(listed.stderr) == [
        "Warning: plugin 'broken' (optiflow-broken 0.1) skipped: failed to load: "
        "ModuleNotFoundError: No module named 'optiflow_no_such_dependency'"
    ]

    strict = run_cli("list", "optimizer", cwd=tmp_path, env={**env, "OPTIFLOW_STRICT_PLUGINS": "1"})
    assert strict.returncode == 2 and strict.stdout == ""
    assert warnings_in(strict.stderr) == [
        "Error: plugin 'broken' (optiflow-broken 0.1) is broken: failed to load: "
        "ModuleNotFoundError: No module named 'optiflow_no_such_dependency' (OPTIFLOW_STRICT_PLUGINS is set)"
    ]


def test_load_plugins_limits_external_plugins(site, invoke, monkeypatch):
    site.install("optiflow-alpha", "alpha", GOOD_PLUGIN.format(prefix="alpha"))
    site.install("optiflow-beta", "beta", GOOD_PLUGIN.format(prefix="beta"))
    assert {"alpha-sgd", "beta-sgd"} <= set(plugins.get_registry().names("optimizer"))

    monkeypatch.setenv("OPTIFLOW_LOAD_PLUGINS", "alpha")
    names = plugins.get_registry().names("optimizer")
    assert "alpha-sgd" in names and "beta-sgd" not in names and "adam" in names

    monkeypatch.setenv("OPTIFLOW_LOAD_PLUGINS", "optiflow_beta")
    assert "beta-sgd" in plugins.get_registry().names("optimizer"), "the distribution name selects it too"

    monkeypatch.setenv("OPTIFLOW_LOAD_PLUGINS", "")
    names = plugins.get_registry().names("optimizer")
    assert not {"alpha-sgd", "beta-sgd"} & set(names) and "adam" in names, "empty means no external plugins"
    rows = {row["name"]: row for row in json.loads(invoke("plugins", "--json").output)}
    assert rows["alpha"]["status"] == "blocked" and rows["alpha"]["distribution"] == "optiflow-alpha"


def test_disabling_a_plugin_removes_its_components_from_list(site, invoke, monkeypatch):
    site.install("optiflow-alpha", "alpha", GOOD_PLUGIN.format(prefix="alpha"))
    assert "alpha-sgd" in invoke("list", "optimizer").output

    listing = invoke("--disable-plugin", "optimizers", "--disable-plugin", "alpha", "list", "optimizer").output
    assert "adam" not in listing and "sgd" not in listing and "alpha-sgd" not in listing
    assert "digits" in invoke("--disable-plugin", "optimizers", "list").output, "other plugins stay"
    rows = {row["name"]: row for row in json.loads(invoke("--disable-plugin", "optimizers", "plugins", "--json").output)}
    assert rows["optimizers"]["status"] == "blocked" and rows["optimizers"]["builtin"]

    monkeypatch.setenv("OPTIFLOW_DISABLE_PLUGINS", "optiflow-alpha, schedulers")
    listing = invoke("list").output
    assert "alpha-sgd" not in listing and "adam" in listing
    assert not [line for line in listing.splitlines() if line.startswith("scheduler ")]
    unknown = invoke("train", "--epochs", "1", "--sched", "step")
    assert unknown.exit_code == 2 and "unknown scheduler 'step'" in unknown.stderr


def test_disabling_a_broken_plugin_silences_it(site, invoke, monkeypatch):
    site.install("optiflow-broken", "broken", BROKEN_PLUGINS["import-error"][0])
    monkeypatch.setenv("OPTIFLOW_STRICT_PLUGINS", "1")
    result = invoke("--disable-plugin", "broken", "list", "optimizer")
    assert result.exit_code == 0 and result.stderr == ""


def test_plugins_json_shows_distribution_hooks_and_components(site, invoke):
    site.install("optiflow-alpha", "alpha", GOOD_PLUGIN.format(prefix="alpha"), version="2.3")
    result = invoke("plugins", "--json")
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["alpha"] == {
        "name": "alpha", "distribution": "optiflow-alpha", "version": "2.3", "builtin": False, "status": "loaded",
        "error": None, "hooks": ["optiflow_register_optimizers"], "components": {"optimizer": ["alpha-sgd"]},
        "namespaced_only": {}, "clashes": [], "commands": [],
    }
    assert rows["optimizers"]["builtin"] and {"adam", "sgd"} <= set(rows["optimizers"]["components"]["optimizer"])
    table = invoke("plugins").output
    assert "optiflow-alpha" in table and "alpha-sgd" in table and "register_optimizers" in table


def test_a_plugin_command_may_not_replace_a_builtin_one(site, invoke):
    site.install("optiflow-clash", "clash", """
        import click
        from optiflow import hookimpl

        @hookimpl
        def optiflow_register_commands(cli):
            @cli.command()
            def train():
                click.echo("hijacked")
        """)
    result = invoke("--help")
    assert result.exit_code == 0
    assert warnings_in(result.stderr) == [
        "Warning: plugin 'clash' (optiflow-clash 0.1) skipped: command 'train' is already provided by 'optiflow'"
    ]
    assert "hijacked" not in invoke("train", "--print-config").output


def test_trace_hooks_prints_every_hook_call(site, invoke, monkeypatch):
    monkeypatch.setenv("OPTIFLOW_TRACE_HOOKS", "1")
    monkeypatch.setattr(plugins, "_manager", None)
    result = invoke("list", "optimizer")
    trace = [line for line in result.stderr.splitlines() if line.startswith("[optiflow trace]")]
    assert any(line.startswith("[optiflow trace] optiflow_register_optimizers(register) <- optimizers")
               for line in trace), trace
    registering = [line for line in trace if "optiflow_register_" in line]
    assert not [line for line in registering if " <- -  " in line], "a plugin is asked only for the hooks it has"


def test_the_tutorial_plugin_works_as_written(site, invoke, mlflow_client, experiment):
    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    blocks = {language: re.findall(rf"```{language}\n(.*?)```", docs, flags=re.S) for language in ("toml", "python", "bash")}
    pyproject = next(b for b in blocks["toml"] if "optiflow-triangular" in b)
    name, version = (re.search(rf'^{key} = "(.+)"', pyproject, flags=re.M).group(1) for key in ("name", "version"))
    entry_point, module = re.search(r'\[project.entry-points.optiflow\]\n(\S+) = "(\S+)"', pyproject).groups()
    source = next(b for b in blocks["python"] if b.startswith(f"# {module}.py"))
    site.install(name, entry_point, source, version, module=module)

    rows = {row["name"]: row for row in json.loads(invoke("plugins", "--json").output)}
    assert rows["triangular"]["components"] == {"regularizer": ["grad-norm", "input-noise"],
                                                "scheduler": ["triangular"]}
    [command] = [line for b in blocks["bash"] for line in b.splitlines() if "--sched triangular" in line]
    result = invoke(*shlex.split(command)[1:], "--epochs", "2", "-q")
    assert result.exit_code == 0, result.output
    [run] = runs_of(mlflow_client, experiment)
    assert run.data.params["reg.input-noise.std"] == "0.05"
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "grad_norm")] == [1, 2]
    learning_rates = [m.value for m in mlflow_client.get_metric_history(run.info.run_id, "lr")]
    assert learning_rates[0] == pytest.approx(0.001) and learning_rates[1] > learning_rates[0], "the cycle rises"

    namespace: dict = {}
    exec(next(b for b in blocks["python"] if b.startswith("# tests/test_triangular.py")), namespace)
    namespace["test_registers_its_components"](None)


def test_a_clashing_name_stays_the_first_plugins_and_the_rest_is_kept(monkeypatch, capsys):
    class First:
        @hookimpl
        def optiflow_register_optimizers(self, register):
            register("same", sample)

    class Second:
        @hookimpl
        def optiflow_register_optimizers(self, register):
            register("same", sample, aliases=["second-same"])
            register("other", sample, aliases=["same"])

        @hookimpl
        def optiflow_register_models(self, register):
            register("second-only", sample)

    def plugin_manager():
        pm = PluginManager()
        pm.register(First(), name="first")
        pm.register(Second(), name="second")
        return pm

    monkeypatch.setenv("OPTIFLOW_STRICT_PLUGINS", "1")
    with pytest.raises(OptiflowError) as info:
        build_registry(plugin_manager())
    assert "'first'" in str(info.value) and "'second'" in str(info.value)

    monkeypatch.delenv("OPTIFLOW_STRICT_PLUGINS")
    registry = build_registry(plugin_manager())
    assert registry.get("optimizer", "same").plugin == "first"
    assert registry.get("optimizer", "first/same").plugin == "first"
    picked = registry.get("optimizer", "second/same")
    assert (picked.plugin, picked.name) == ("second", "second/same")
    assert registry.get("optimizer", "second-same") is picked, "its aliases nobody else has still work"
    assert registry.get("optimizer", "other").plugin == "second", "a clashing alias drops only the alias"
    assert "second-only" in registry.names("model"), "the plugin's other components stay"
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2, warnings
    assert all(w.startswith("Warning: plugin 'second'") and "'first'" in w for w in warnings)
    assert "use --opt second/same for plugin 'second's" in warnings[0]


def test_a_clash_is_picked_by_plugin_name_on_the_command_line(site, invoke):
    site.install("optiflow-dup", "dup", """
        from optiflow import hookimpl

        @hookimpl
        def optiflow_register_optimizers(register):
            def adam(model, *, lr: float = 0.05):
                \"\"\"Plain SGD under a famous name.\"\"\"
                import torch
                return torch.optim.SGD(model.parameters(), lr=lr)
            register("adam", adam)
            register("dup-sgd", adam)
        """)
    result = invoke("train", "--epochs", "1", "--opt", "dup/adam", "--data", "iris", "-q")
    assert result.exit_code == 0, result.output
    lines = warnings_in(result.stderr)
    assert len(lines) == 1 and "optimizer 'adam' is registered by plugin 'optimizers' and again by plugin 'dup'" in lines[0]


MINE_PLUGIN = """
from optiflow import hookimpl


@hookimpl
def optiflow_register_optimizers(register):
    register("adam", adam, namespaced_only=True, aliases=["my-adam"])
    register("nadam-ish", adam)


def adam(model, *, lr: float = 0.05):
    '''Plain SGD under a famous name, on purpose.'''
    import torch

    return torch.optim.SGD(model.parameters(), lr=lr)
"""


def test_a_namespaced_only_name_reuses_a_builtin_without_clash_even_in_strict_mode(site, invoke, monkeypatch):
    site.install("optiflow-mine", "mine", MINE_PLUGIN)
    monkeypatch.setenv("OPTIFLOW_STRICT_PLUGINS", "1")
    result = invoke("train", "--epochs", "1", "--opt", "mine/adam", "--data", "iris", "-q")
    assert result.exit_code == 0, result.output
    assert warnings_in(result.stderr) == []
    registry = plugins.get_registry()
    assert registry.get("optimizer", "adam").plugin == "optimizers", "the bare name stays the built-in's"
    assert registry.get("optimizer", "mine/adam").plugin == "mine"
    assert registry.get("optimizer", "Mine/my-adam").plugin == "mine", "an alias answers as plugin/alias"
    with pytest.raises(OptiflowError, match="unknown optimizer 'my-adam'"):
        registry.get("optimizer", "my-adam")
    rows = {row["name"]: row for row in json.loads(invoke("plugins", "--json").output)}
    assert rows["mine"]["namespaced_only"] == {"optimizer": ["mine/adam"]}
    assert rows["mine"]["components"] == {"optimizer": ["mine/adam", "nadam-ish"]}
    assert rows["mine"]["clashes"] == []
    listed = {r["name"]: r for r in json.loads(invoke("list", "optimizer", "--json").output)}
    assert listed["mine/adam"]["namespaced_only"] is True and listed["nadam-ish"]["namespaced_only"] is False


def test_an_accidental_clash_still_warns_and_is_listed(site, invoke, monkeypatch):
    site.install("optiflow-mine", "mine", MINE_PLUGIN.replace('"nadam-ish"', '"sgd"'))
    result = invoke("plugins", "--json")
    [clash] = next(row["clashes"] for row in json.loads(result.stdout) if row["name"] == "mine")
    assert clash.startswith("optimizer 'sgd' is registered by plugin 'optimizers' and again by plugin 'mine'")
    assert "optimizer 'sgd' is registered by plugin 'optimizers'" in result.stderr
    monkeypatch.setenv("OPTIFLOW_STRICT_PLUGINS", "1")
    monkeypatch.setattr(plugins, "_manager", None)
    strict = invoke("list", "optimizer")
    assert strict.exit_code == 2 and "OPTIFLOW_STRICT_PLUGINS is set" in strict.output


def test_a_plugin_registering_one_qualified_name_twice_is_rejected(capsys):
    class Twice:
        @hookimpl
        def optiflow_register_optimizers(self, register):
            register("adam", sample, namespaced_only=True)
            register("adam", sample)

    pm = PluginManager()
    pm.register(Twice(), name="twice")
    registry = build_registry(pm)
    assert "duplicate optimizer 'twice/adam': registered twice by plugin 'twice'" in capsys.readouterr().err
    assert not [c for c in registry.select("optimizer") if c.plugin == "twice"]


def test_an_unknown_name_points_at_the_skipped_plugin(site, invoke):
    site.install("optiflow-sam", "sam", "import optiflow_no_such_dependency\n")
    result = invoke("train", "--epochs", "1", "--opt", "sam", "-q")
    assert result.exit_code == 2
    assert "unknown optimizer 'sam'" in result.output and "Plugin 'sam' was skipped: see the warning above" in result.output


def test_each_registration_hook_registers_only_its_own_family(monkeypatch, capsys):
    class Misplaced:
        @hookimpl
        def optiflow_register_optimizers(self, register):
            register("fine", sample)
            register("a-model", sample, kind="model")

    pm = PluginManager()
    pm.register(Misplaced(), name="misplaced")
    registry = build_registry(pm)
    warning = capsys.readouterr().err
    assert "registered model 'a-model' from optiflow_register_optimizers" in warning
    assert "optiflow_register_models" in warning
    assert "fine" not in registry.names("optimizer") and "a-model" not in registry.names("model")
    with pytest.raises(OptiflowError, match="unknown kind 'widget'"):
        Registry().registrar("model", "tests")("w", sample, kind="widget")


def test_list_piped_into_grep_shows_one_whole_line_per_component(tmp_path):
    listed = run_cli("list", cwd=tmp_path, env={"COLUMNS": "80"})
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["kind", "name", "options", "description", "plugin"]
    assert len(lines) == 1 + sum(len(plugins.get_registry().names(kind)) for kind in KINDS)
    (found,) = [line for line in lines if "kaiming-normal" in line]
    assert found.split()[:2] == ["initializer", "kaiming-normal"] and found.split()[-1] == "initializers"
    assert "mode=fan_in" in found and "He/Kaiming normal" in found
    assert not {"│", "┃", "━"} & set(listed.stdout)

    table = run_cli("plugins", cwd=tmp_path, env={"COLUMNS": "80"})
    (initializers,) = [line for line in table.stdout.splitlines() if line.startswith("initializers ")]
    assert "register_initializers" in initializers and "kaiming-normal, kaiming-uniform" in initializers


@pytest.mark.parametrize("command", ["list", "plugins"])
def test_an_80_column_terminal_never_splits_a_name(command, invoke, monkeypatch):
    from rich.console import Console

    from optiflow import console

    monkeypatch.setattr(console, "console", Console(force_terminal=True, width=80, color_system=None))
    output = invoke(command).output
    assert "┃" in output and max(map(len, output.splitlines())) <= 80, "a table, fitted to the terminal"
    words = set(re.findall(r"[\w-]+", output))
    registry = plugins.get_registry()
    assert {name for kind in KINDS for name in registry.names(kind)} <= words
    if command == "plugins":
        assert {f"register_{family}" for family in ("optimizers", "regularizers", "initializers")} <= words


def test_list_json_describes_each_component(invoke):
    result = invoke("list", "--json")
    assert result.exit_code == 0
    records = {(r["kind"], r["name"]): r for r in json.loads(result.output)}
    assert len(records) == sum(len(plugins.get_registry().names(kind)) for kind in KINDS)
    kaiming = records["initializer", "kaiming-normal"]
    assert set(kaiming) == {"kind", "name", "aliases", "options", "description", "plugin", "namespaced_only"}
    assert kaiming["namespaced_only"] is False
    assert kaiming["plugin"] == "initializers" and kaiming["description"].startswith("He/Kaiming normal")
    assert {"name": "mode", "type": "fan_in|fan_out", "default": "fan_in", "choices": ["fan_in", "fan_out"]} in \
        kaiming["options"]
    assert records["loss", "cross-entropy"]["aliases"] == ["ce"]
    assert {"name": "hidden", "type": "list of int", "default": [256], "choices": None} in \
        records["model", "mlp"]["options"]
    only = json.loads(invoke("list", "optimizers", "--json", "--pattern", "adam*").output)
    assert only and {r["kind"] for r in only} == {"optimizer"} and all(r["name"].startswith("adam") for r in only)


def test_list_and_plugins_commands(invoke):
    result = invoke("list", "optimizer")
    assert result.exit_code == 0 and "adam" in result.output and "sgd" in result.output
    assert "dataset" not in result.output
    result = invoke("list", "nonsense")
    assert result.exit_code == 2 and "unknown kind 'nonsense'" in result.stderr
    result = invoke("plugins")
    assert result.exit_code == 0
    assert "optimizers" in result.output and "register_optimizers" in result.output


def test_an_optional_hook_pluggy_knows_nothing_of_loads_and_an_unknown_one_is_refused(site, invoke):
    """pluggy's check_pending() decides: optionalhook=True implementations of hooks optiflow does not have
    (yet) are fine, any other unknown hook rejects its plugin in one line naming it and the hook."""
    site.install("optiflow-future", "future", """
        from optiflow import hookimpl

        @hookimpl(optionalhook=True)
        def optiflow_hook_of_a_later_version(run):
            pass

        @hookimpl
        def optiflow_register_optimizers(register):
            register("future-sgd", lambda model, *, lr=0.1: None)
        """)
    site.install("optiflow-typo", "typo", """
        from optiflow import hookimpl

        @hookimpl
        def optiflow_run_strat(run):
            pass
        """)
    result = invoke("list", "optimizer")
    assert "future-sgd" in result.output
    assert warnings_in(result.stderr) == [
        "Warning: plugin 'typo' (optiflow-typo 0.1) skipped: failed to load: implements unknown hook "
        "'optiflow_run_strat' (see docs/plugins.md for the hooks)"
    ]


def test_plugin_names_compare_like_package_names_everywhere():
    from optiflow.plugins import PluginSelection
    from optiflow.registry import plugin_key

    assert plugin_key(" My_Plugin.x ") == plugin_key("my-plugin-x") == "my-plugin-x"
    selection = PluginSelection(disabled=frozenset({plugin_key("My_Plugin")}))
    assert not selection.allows("my.plugin") and selection.allows("my-plugins")
