"""One coercion and one true/false vocabulary (optiflow/values.py): configuration keys, component options,
Optuna sampler options, search choices and environment switches all read a value the same way."""

from __future__ import annotations

import pytest

from optiflow.config import RunConfig
from optiflow.errors import OptiflowError
from optiflow.registry import Option
from optiflow.values import FALSE_WORDS, TRUE_WORDS, env_flag, literal

SPELLINGS = [(word, True) for word in sorted(TRUE_WORDS)] + [(word, False) for word in sorted(FALSE_WORDS)]


def test_the_vocabulary_keeps_every_spelling_any_reader_accepted_before():
    assert {"1", "true", "yes", "on", "y", "t"} <= TRUE_WORDS  # options took all six, config and env four
    assert {"0", "false", "no", "off", "n", "f"} <= FALSE_WORDS
    assert not TRUE_WORDS & FALSE_WORDS


@pytest.mark.parametrize("word, meaning", SPELLINGS)
def test_a_configuration_key_and_a_component_option_read_a_bool_word_alike(word, meaning):
    for spelling in (word, word.upper(), f" {word} "):
        assert RunConfig.from_dict({"shuffle": spelling}).shuffle is meaning
        assert Option("nesterov", bool).coerce(spelling) is meaning


@pytest.mark.parametrize("word, meaning", SPELLINGS)
def test_environment_switches_read_the_same_words(word, meaning, monkeypatch):
    from optiflow.hooktrace import tracing

    monkeypatch.setenv("OPTIFLOW_TRACE_HOOKS", word.upper())
    monkeypatch.setenv("OPTIFLOW_STRICT_PLUGINS", word)
    assert tracing() is meaning and env_flag("OPTIFLOW_STRICT_PLUGINS") is meaning


@pytest.mark.parametrize("word, meaning", SPELLINGS + [("", True), ("maybe", True)])
def test_the_malloc_switch_is_on_by_default_and_off_for_every_false_word(word, meaning, monkeypatch):
    """OPTIFLOW_MALLOC_TUNING once turned off only for "0": "off", "false", "no" left it on."""
    from optiflow import host

    calls = []

    class Mallopt:
        def __call__(self, *args):
            calls.append(args)
            return 1

    monkeypatch.setattr(host, "_glibc", lambda: True)
    monkeypatch.setattr(host.ctypes, "CDLL", lambda _name: type("Libc", (), {"mallopt": Mallopt()})())
    monkeypatch.setenv(host.ENV_SWITCH, f" {word.upper()} ")
    assert host.keep_freed_memory.__wrapped__() is meaning
    assert bool(calls) is meaning


@pytest.mark.parametrize("word", ["maybe", "2", "tru", ""])
def test_a_word_outside_the_vocabulary_is_no_bool(word, monkeypatch):
    with pytest.raises(OptiflowError, match="configuration key 'shuffle' expects bool"):
        RunConfig.from_dict({"shuffle": word or "  "})
    with pytest.raises(OptiflowError, match="option 'nesterov' expects bool"):
        Option("nesterov", bool).coerce(word, owner="optimizer 'sgd'")
    monkeypatch.setenv("OPTIFLOW_STRICT_PLUGINS", word)
    assert env_flag("OPTIFLOW_STRICT_PLUGINS") is False


@pytest.mark.parametrize("text, expected", [
    ("12", 12), (" 12 ", 12), (12.0, 12), ("1e3", 1000), ("2E2", 200), ("4e9", 4_000_000_000),
])
def test_integers_read_alike_in_the_configuration_and_in_options(text, expected):
    assert RunConfig.from_dict({"seed": text}).seed == expected
    assert Option("n", int).coerce(text) == expected


@pytest.mark.parametrize("text", ["2.5", 2.5, "2.5e0", "1e30", "1e400", "0x10", "nan", True, [1]])
def test_a_value_that_is_no_exact_integer_is_refused_alike(text):
    """A fraction, a number in float notation beyond 2**53 (no longer exact), hex, a bool, a list."""
    with pytest.raises(OptiflowError, match="configuration key 'epochs' expects int"):
        RunConfig.from_dict({"epochs": text})
    with pytest.raises(OptiflowError, match="option 'n' expects int"):
        Option("n", int).coerce(text, owner="dataset 'linear'")


def test_non_finite_floats_reach_the_configuration_check_that_names_the_range():
    """Options refuse inf and nan at once; a configuration key leaves them to its own range check."""
    with pytest.raises(OptiflowError, match="learning rate must be > 0 and finite, got inf"):
        RunConfig.from_dict({"lr": "inf"})
    with pytest.raises(OptiflowError, match="option 'lr' expects float, got 'inf'"):
        Option("lr", float).coerce("inf", owner="optimizer 'sgd'")


@pytest.mark.parametrize("value", [True, {"a": 1}, [1, 2], None])
def test_a_text_key_refuses_containers_but_takes_yaml_scalars(value):
    if value is True:
        assert RunConfig.from_dict({"run_name": value}).run_name == "True"
        assert Option("mode", str).coerce(value) == "True"
        return
    if value is not None:
        with pytest.raises(OptiflowError, match="configuration key 'experiment' expects str"):
            RunConfig.from_dict({"experiment": value})
    with pytest.raises(OptiflowError, match="option 'mode' expects str"):
        Option("mode", str).coerce(value, owner="model 'mlp'")


@pytest.mark.parametrize("text, expected", [
    ("3", 3), ("0.5", 0.5), ("1e30", 1e30), ("true", True), ("False", False), ("on", "on"), ("off", "off"),
    ("adam", "adam"), (7, 7), (None, None),
])
def test_an_untyped_search_choice_is_typed_only_where_every_reader_agrees(text, expected):
    """``choice:on,off`` stays text (a mode may be called off); the option it sets reads it as a bool."""
    value = literal(text)
    assert value == expected and type(value) is type(expected)


def test_optuna_options_are_coerced_to_the_type_of_the_constructor_default():
    import optuna

    from optiflow.search.space import Dimension
    from optiflow.search.study import SearchSettings, make_sampler, parse_component

    name, options = parse_component("tpe:multivariate=on,n_startup_trials=5", ("tpe",), "sampler")
    assert options == {"multivariate": "on", "n_startup_trials": 5}
    settings = SearchSettings([Dimension("lr", "lr")], sampler=name, sampler_options=options)
    sampler = make_sampler(settings)
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._multivariate is True
    for bad, expected in ((True, "int"), ("abc", "int"), (2.5, "int")):
        settings.sampler_options = {"n_startup_trials": bad}
        with pytest.raises(OptiflowError, match=f"sampler 'tpe': option 'n_startup_trials' expects {expected}"):
            make_sampler(settings)


@pytest.mark.parametrize("spelling", ["batch-size", "batch_size"])
def test_a_key_reads_alike_with_dashes_or_underscores(spelling):
    """values.key_name: a flag's dashes are a key's underscores, in a config file and a component option."""
    from optiflow.values import dashed_name, key_name

    assert RunConfig.from_dict({spelling: 64}).batch_size == 64
    assert key_name(spelling) == "batch_size" and dashed_name(key_name(spelling)) == "batch-size"
