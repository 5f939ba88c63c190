"""benchmarks/conditions.py: a round taken under load is marked not comparable and left out of summaries."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import conditions  # noqa: E402
from conditions import Round, comparable_only  # noqa: E402


@pytest.fixture
def machine(monkeypatch):
    """A 4-core machine whose load average the test sets, with no /proc/stat reading unless given."""
    state = {"load": 0.1, "busy": None}
    monkeypatch.setattr(conditions.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(conditions.os, "getloadavg", lambda: (state["load"], 0.0, 0.0))
    monkeypatch.setattr(conditions, "_machine_busy", lambda: state["busy"])
    return state


def test_a_quiet_round_is_comparable_and_says_its_load(machine, capsys):
    with Round("round 1") as quiet:
        machine["load"] = 0.3
    assert quiet.comparable and (quiet.before, quiet.after) == (0.1, 0.3)
    line = capsys.readouterr().out
    assert "round 1: load 0.10 -> 0.30 (4 cores)" in line and "comparable" in line and "NOT" not in line


def test_load_above_half_a_core_before_the_round_makes_it_not_comparable(machine):
    machine["load"] = 2.1  # 0.525 per core
    with Round("round", quiet=True) as loaded:
        pass
    assert not loaded.comparable and "NOT comparable" in loaded.describe()


def test_others_busy_during_the_round_make_it_not_comparable(machine, monkeypatch):
    machine["busy"] = 1000.0
    with Round("round", quiet=True) as busy:
        machine["busy"] = 1000.0 + 1e6  # far more CPU than this process used: someone else's work
    assert busy.others_cores is not None and busy.others_cores > 2 and not busy.comparable


def test_the_benchmarks_own_load_is_not_held_against_it(machine):
    machine["busy"] = 1000.0
    with Round("round", quiet=True) as own:
        machine["load"] = 3.0  # the load average after counts this round's own work
        sum(i * i for i in range(200_000))
        machine["busy"] = 1000.0 + conditions._own_cpu() - own._own  # the machine was busy with this process only
    assert own.others_cores is not None and own.others_cores < 2 and own.comparable


def test_settle_waits_for_the_load_to_fall_but_not_forever(machine, monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(conditions.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(conditions.time, "sleep", lambda seconds: clock.update(now=clock["now"] + seconds))
    loads = iter([3.0, 2.5, 1.5, 9.0])
    monkeypatch.setattr(conditions.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    assert conditions.settle(60) == 1.5 and clock["now"] == 10.0  # the limit on 4 cores is 2.0
    monkeypatch.setattr(conditions.os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    assert conditions.settle(12) == 3.0 and clock["now"] == 22.0


def test_summaries_use_comparable_rounds_only_and_say_when_there_are_none(machine):
    rounds = []
    for load in (0.1, 2.5, 0.2):
        machine["load"] = load
        with Round("round", quiet=True) as round_:
            pass
        rounds.append(round_)
    kept, note = comparable_only(rounds, ["a", "b", "c"])
    assert kept == ["a", "c"] and note == "summary of the 2 comparable round(s) of 3"
    kept, note = comparable_only(rounds[1:2], ["b"])
    assert kept == ["b"] and note.startswith("NO comparable round") and "NOT comparable" in note
