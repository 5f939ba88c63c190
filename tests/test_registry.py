"""The registry: options from factory signatures, typing, duplicates, lookups."""

from __future__ import annotations

from typing import Literal

import pytest

from optiflow import hookimpl, hookspecs
from optiflow.config import ComponentSpec
from optiflow.errors import OptiflowError
from optiflow.plugins import PluginManager, build_registry
from optiflow.registry import Registry


def sample(ctx, *, rate: float = 0.1, depth: int = 2, name: str = "x", flag: bool = False,
           sizes: tuple[int, ...] = (4, 2), mode: Literal["a", "b"] = "a", maybe: float | None = None):
    """A sample component.

    More text that is not the description.
    """
    return dict(rate=rate, depth=depth, name=name, flag=flag, sizes=sizes, mode=mode, maybe=maybe)


def make_registry() -> Registry:
    registry = Registry()
    registry.registrar("dataset", "tests")("sample", sample, aliases=["smp"])
    return registry


def test_options_come_from_keyword_only_parameters():
    component = make_registry().get("dataset", "sample")
    assert component.description == "A sample component."
    assert [o.name for o in component.options] == ["rate", "depth", "name", "flag", "sizes", "mode", "maybe"]
    assert component.defaults["sizes"] == (4, 2)
    assert component.plugin == "tests"


def test_cli_strings_are_typed_by_the_declared_options():
    component = make_registry().get("dataset", "sample")
    spec = ComponentSpec.parse("sample:rate=0.5,depth=3,flag=true,sizes=[8,4,2],mode=b,maybe=none")
    options = component.resolve_options(spec.options)
    assert options == dict(rate=0.5, depth=3, name="x", flag=True, sizes=(8, 4, 2), mode="b", maybe=None)
    assert component.resolve_options({"sizes": "16-8", "maybe": "0.2"})["sizes"] == (16, 8)
    assert component.resolve_options({"maybe": "0.2"})["maybe"] == 0.2


@pytest.mark.parametrize(
    "options, message",
    [
        ({"depth": "2.5"}, "option 'depth' expects int"),
        ({"flag": "maybe"}, "option 'flag' expects bool"),
        ({"mode": "c"}, "option 'mode' must be one of a, b"),
        ({"rat": "1"}, "has no option 'rat' (did you mean 'rate'?); valid options: rate, depth"),
    ],
)
def test_bad_options_name_the_valid_ones(options, message):
    with pytest.raises(OptiflowError, match=None) as info:
        make_registry().get("dataset", "sample").resolve_options(options)
    assert message in str(info.value)


def test_aliases_and_underscores_resolve():
    registry = make_registry()
    assert registry.get("dataset", "smp").name == "sample"
    registry.registrar("dataset", "tests")("two-words", sample)
    assert registry.get("dataset", "two_words").name == "two-words"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(OptiflowError) as info:
        make_registry().get("dataset", "sampel")
    assert "unknown dataset 'sampel'. Did you mean 'sample'" in str(info.value)


def test_duplicate_name_names_both_plugins():
    registry = make_registry()
    with pytest.raises(OptiflowError) as info:
        registry.registrar("dataset", "other-plugin")("sample", sample)
    assert "duplicate dataset 'sample'" in str(info.value)
    assert "'tests'" in str(info.value) and "'other-plugin'" in str(info.value)
    with pytest.raises(OptiflowError, match="duplicate dataset 'smp'"):
        registry.registrar("dataset", "third")("smp", sample)


def test_duplicate_across_plugins_through_the_hooks(monkeypatch, capsys):
    class First:
        @hookimpl
        def optiflow_register_optimizers(self, register):
            register("same", sample)

    class Second(First):
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
    assert "second-only" not in registry.names("model"), "the rejected plugin's other components must go too"
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "duplicate optimizer 'same'" in warning[0] and "'second'" in warning[0]


def test_component_spec_round_trips():
    spec = ComponentSpec.parse("mlp:hidden=[64,32],activation=tanh")
    assert spec.name == "mlp" and spec.options == {"hidden": "[64,32]", "activation": "tanh"}
    assert ComponentSpec.parse(str(spec)) == spec
    assert ComponentSpec.parse({"name": "sgd", "momentum": 0.9}) == ComponentSpec("sgd", {"momentum": 0.9})
    with pytest.raises(OptiflowError, match="malformed option 'momentum' in 'sgd:momentum'"):
        ComponentSpec.parse("sgd:momentum")


def test_builtin_registry_has_every_family(tmp_path):
    from optiflow.plugins import get_registry
    from optiflow.registry import FAMILIES

    registry = get_registry()
    for family, kinds in FAMILIES.items():
        assert registry.list(kinds[0]), f"no built-in {kinds[0]}"
        assert all(c.plugin for c in registry.list(kinds[0]))


def test_list_and_plugins_commands(invoke):
    result = invoke("list", "optimizer")
    assert result.exit_code == 0 and "adam" in result.output and "sgd" in result.output
    assert "dataset" not in result.output
    result = invoke("list", "nonsense")
    assert result.exit_code == 2 and "unknown kind 'nonsense'" in result.stderr
    result = invoke("plugins")
    assert result.exit_code == 0
    assert "optimizers" in result.output and "register_optimizers" in result.output


def test_identity_activation_makes_an_mlp_a_linear_map():
    """What the forgotten-activations example relies on: without a nonlinearity the layers compose linearly."""
    import torch

    from optiflow.plugins import get_registry

    model = get_registry().get("model", "mlp").build((4,), 3, hidden=(8, 5), activation="identity")
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    bias = model(torch.zeros(1, 4))
    assert torch.allclose(model(a + b) - bias, (model(a) - bias) + (model(b) - bias), atol=1e-5)
