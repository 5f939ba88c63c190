"""The registry (optiflow/registry.py): options from factory signatures, typing, duplicates, lookups, and
`optiflow list`, its view on the command line."""

from __future__ import annotations

from typing import Literal

import pytest

from optiflow.config import ComponentSpec
from optiflow.errors import OptiflowError
from optiflow.registry import Registry


def sample(ctx, *, rate: float = 0.1, depth: int = 2, name: str = "x", flag: bool = False,
           sizes: tuple[int, ...] = (4, 2), mode: Literal["a", "b"] = "a", maybe: float | None = None):
    """A sample component.

    More text that is not the description.
    """
    return dict(rate=rate, depth=depth, name=name, flag=flag, sizes=sizes, mode=mode, maybe=maybe)


def make_registry() -> Registry:
    registry = Registry()
    registry.registrar("data", "tests")("sample", sample, aliases=["smp"])
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
    registry.registrar("data", "tests")("two-words", sample)
    assert registry.get("dataset", "two_words").name == "two-words"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(OptiflowError) as info:
        make_registry().get("dataset", "sampel")
    assert "unknown dataset 'sampel'. Did you mean 'sample'" in str(info.value)


def test_a_taken_name_stays_its_owners_and_the_newcomer_is_qualified():
    registry = make_registry()
    newcomer = registry.registrar("data", "other-plugin")("sample", sample)
    assert newcomer.name == "other-plugin/sample"
    assert registry.get("dataset", "sample").plugin == "tests"
    assert registry.get("dataset", "other_plugin/sample") is newcomer, "plugin names compare like package names"
    assert registry.get("dataset", "tests/smp").plugin == "tests", "every component answers to plugin/name"
    [(plugin, line)] = registry.clashes
    assert plugin == "other-plugin" and "'tests'" in line and "'other-plugin'" in line
    assert "--data other-plugin/sample" in line
    kept = registry.registrar("data", "third")("third-sample", sample, aliases=["smp"])
    assert (kept.name, kept.aliases) == ("third-sample", ()), "only the clashing alias is dropped"
    assert registry.get("dataset", "smp").plugin == "tests"


def test_one_plugin_registering_a_name_twice_is_an_error():
    registry = make_registry()
    with pytest.raises(OptiflowError, match="duplicate dataset 'smp': registered twice by plugin 'tests'"):
        registry.registrar("data", "tests")("smp", sample)


def test_an_option_that_is_not_keyword_only_is_refused_naming_it():
    def positional_default(model, lr=0.1, *, momentum: float = 0.0):
        return model

    with pytest.raises(OptiflowError, match="optimizer 'bad': parameter 'lr' has a default but is not keyword-only"):
        Registry().registrar("optimizer", "tests")("bad", positional_default)


def test_list_takes_plurals_and_names_each_kind_once(invoke):
    result = invoke("list", "losses")
    assert result.exit_code == 0 and "cross-entropy" in result.output
    result = invoke("list", "optimizers")
    assert result.exit_code == 0 and "adam" in result.output
    message = invoke("list", "nonsense").stderr
    choices = message.split("choose from", 1)[1].replace(".", "").split(",")
    names = [name.strip() for name in choices]
    assert len(names) == len(set(names)) and {"data", "loss", "initializer"} <= set(names)


@pytest.mark.parametrize("text, expected", [
    ("[64,32]", (64, 32)), ("64-32", (64, 32)), ("2x3", (2, 3)), ("[-5]", (-5,)), ("-5", (-5,)), ("[]", ()),
])
def test_list_options_read_signs_as_signs(text, expected):
    from optiflow.registry import Option

    assert Option("sizes", tuple[int, ...]).coerce(text) == expected


@pytest.mark.parametrize("text", ["[", "[64", "64]", "][", "[1,[2]]", "nan", "inf"])
def test_malformed_or_non_finite_option_values_are_refused(text):
    from optiflow.registry import Option

    option_type = tuple[int, ...] if "[" in text or "]" in text else float
    with pytest.raises(OptiflowError, match="option 'x' expects"):
        Option("x", option_type).coerce(text, owner="test")
