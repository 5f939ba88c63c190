"""Every default a --help text names in brackets (``[20]``, ``[tpe]``, ``Dataset [digits]``) is the option's
real default: the slot table's, RunConfig's or SearchSettings' field, or click's, so a help text cannot drift
from the code."""

from __future__ import annotations

import dataclasses
import re

import click
import pytest

from optiflow.cli import cli
from optiflow.config import RunConfig
from optiflow.flags import TRAIN_FLAGS
from optiflow.search.study import DERIVED, SearchSettings
from optiflow.slots import SLOT_BY_KEY

#: the first bracket of a help text after a space (``hidden=[256,128]`` and ``float:0:0.5[:STEP]`` are values)
#: the help of each training flag (train, compare, search, lr-preview...), whose default is RunConfig's
TRAIN_HELP = {name: click.command()(flag(lambda **_: None)).params[0].help for name, flag in TRAIN_FLAGS.items()}
BRACKET = re.compile(r"(?:^|\s)\[([^\]]*)\]")


def commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    found = {}
    for name, command in group.commands.items():
        found[f"{prefix}{name}"] = command
        if isinstance(command, click.Group):
            found |= commands(command, f"{prefix}{name} ")
    return found


def field_default(owner: type, name: str) -> object:
    for field in dataclasses.fields(owner):
        if field.name == name:
            return field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    return dataclasses.MISSING


def code_default(command: str, param: click.Option) -> object:
    """The default the code gives ``param`` of ``command``: None where it has none to show."""
    name = param.name or ""
    if name in SLOT_BY_KEY:
        return SLOT_BY_KEY[name].default
    owner = RunConfig if TRAIN_HELP.get(name) == param.help else SearchSettings if command == "search" else None
    default = dataclasses.MISSING if owner is None else field_default(owner, name)
    if default is dataclasses.MISSING:
        default = param.default
    return default if isinstance(default, (str, int, float, bool)) else None  # click's UNSET: none to show


def shown(default: object, param: click.Option) -> set[str]:
    """How a help text may write ``default``: a boolean switch by its flag's name (or yes/no)."""
    if isinstance(default, bool):
        names = param.opts if default else param.secondary_opts
        return {"yes" if default else "no", *(n.lstrip("-") for n in names)}
    return {str(default)}


def bracketed() -> list[tuple[str, click.Option, str]]:
    found = []
    for name, command in sorted(commands(cli).items()):
        for param in command.params:
            match = BRACKET.search(getattr(param, "help", None) or "")
            if isinstance(param, click.Option) and match:
                found.append((name, param, match.group(1)))
    return found


def test_help_texts_name_defaults():
    named = {(command, param.name) for command, param, _ in bracketed()}
    assert {("train", "epochs"), ("train", "data"), ("search", "sampler"), ("search", "n_trials")} <= named


@pytest.mark.parametrize("command, param, text", bracketed(), ids=lambda v: getattr(v, "name", v))
def test_a_bracketed_default_in_a_help_text_is_the_real_default(command, param, text):
    """The bracket's first word (before ``;`` or ``:``) is the default; a search setting whose default follows from
    others (the direction from the metric) names its rule, which must end in the default."""
    default = code_default(command, param)
    if default is None:
        return  # no default to name: the bracket says what happens instead ("[unseeded]", "[in memory]")
    first = re.split(r"[;:]", text)[0].strip()
    derived = command == "search" and param.name in DERIVED and any(text.endswith(w) for w in shown(default, param))
    assert first in shown(default, param) or derived, \
        f"{command} --{param.name}: help says [{text}], the code's default is {default!r}"


def test_the_check_catches_a_drifted_help_text(monkeypatch):
    """A training flag's help naming another default than RunConfig's, and another option's than click's."""
    [epochs] = [p for p in commands(cli)["train"].params if p.name == "epochs"]
    drifted = click.Option(["--epochs"], type=int, help=(epochs.help or "").replace("[20]", "[25]"))
    stale = click.Option(["--workers"], type=int, default=4, help="Worker processes [2].")
    monkeypatch.setitem(TRAIN_HELP, "epochs", drifted.help)
    for option, said, real in ((drifted, 25, 20), (stale, 2, 4)):
        text = BRACKET.search(option.help or "").group(1)
        with pytest.raises(AssertionError, match=rf"help says \[{said}\], the code's default is {real}"):
            test_a_bracketed_default_in_a_help_text_is_the_real_default("train", option, text)
