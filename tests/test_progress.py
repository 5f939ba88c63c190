"""Where a search or comparison is going: the ETA from measured durations, the live display on a terminal and
plain lines in a pipe or with -q, and --dry-run's plan and estimate, which opens no run and creates no store."""

from __future__ import annotations

import io
import math
import re

import pytest

from optiflow import console as console_module
from optiflow.console import PipeFriendlyConsole
from optiflow.forecast import Calibration, Tick, estimate_runs, eta
from optiflow.values import duration_text, parse_duration

TINY = ("--model", "mlp:hidden=[16]", "--batch-size", "64", "--epochs", "1")
SEARCH = ("search", "--space", "lr=loguniform:0.02:0.1", "--sampler", "random", "--n-trials", "2", "--no-refit", *TINY)
COMPARE = ("compare", "--vary", "opt=sgd,adam", *TINY)


def test_eta_is_the_mean_measured_time_for_the_rounds_left():
    assert eta([2.0, 4.0], remaining=3) == 9.0
    assert eta([2.0, 4.0], remaining=3, parallel=2) == 6.0  # 2 rounds: 2 at once, then 1
    assert eta([0.5, 10.0, 10.0], remaining=1) == pytest.approx(20.5 / 3)  # a pruned trial costs what it took
    assert eta([], remaining=3) is None
    assert eta([1.0, math.nan, -1.0], remaining=2) == 2.0  # nothing unmeasurable counts
    assert eta([5.0], remaining=0) == 0.0 and eta([], remaining=-1) == 0.0


def test_estimate_runs_from_a_calibration():
    calibration = Calibration(setup_seconds=1.0, epoch_seconds=0.5, test_seconds=0.25)
    assert calibration.run_seconds(10) == 6.25
    assert estimate_runs(calibration, [10, 10, 20]) == pytest.approx(6.25 + 6.25 + 11.25)
    assert estimate_runs(calibration, [10] * 4, parallel=3) == pytest.approx(2 * 6.25)
    assert estimate_runs(calibration, []) == 0.0


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200),
                                                ("1h30m", 5400), (" 1.5h ", 5400), ("1d", 86400), (".5m", 30)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "30x", "1h 30", "-5s", "0", "nan", "inf", "10s5", "h1"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_duration_text():
    assert [duration_text(s) for s in (0.44, 9.9, 42, 185, 7800)] == ["0.4s", "9.9s", "42s", "3m05s", "2h10m"]


def test_a_tick_line_says_done_of_total_last_time_best_and_eta():
    tick = Tick(3, 10, "trial 2 complete: val_loss=0.1", 12.0, 84.0, "val_loss=0.1 (trial 2: lr=0.01)")
    assert tick.line() == ("[3/10] trial 2 complete: val_loss=0.1  ·  last 12s  ·  best val_loss=0.1 (trial 2: "
                           "lr=0.01)  ·  ETA 1m24s")
    assert "ETA" not in Tick(1, 2, "x", 1.0, None).line()
    assert str(tick) == tick.line()


@pytest.fixture
def terminal(monkeypatch):
    """The console as a terminal (rich's force_terminal), its output kept."""
    out = io.StringIO()
    monkeypatch.setattr(console_module, "console", PipeFriendlyConsole(file=out, force_terminal=True, width=200))
    return out


@pytest.mark.parametrize("args", [SEARCH, COMPARE], ids=["search", "compare"])
def test_a_terminal_gets_a_live_bar_not_lines(invoke, terminal, args):
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    shown = terminal.getvalue()
    assert "2/2" in shown and "ETA" in shown and "best " in shown and "last " in shown
    assert "[1/2]" not in shown and "\x1b[" in shown  # the bar, drawn with terminal codes, not a plain line


def test_an_80_column_bar_keeps_the_count_and_the_eta_and_cuts_the_best_short(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(console_module, "console", PipeFriendlyConsole(file=out, force_terminal=True, width=80))
    best = "val_accuracy=0.9712 (trial 7: lr=0.0123, opt=adam, hidden=128, dropout=0.25, momentum=0.9)"
    with console_module.WorkProgress("trials", quiet=False) as progress:
        progress(Tick(12, 40, "trial 11 complete", 3.2, 130.0, best))
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    shown = [line for line in re.split(r"[\r\n]", plain) if line.startswith("trials")][-1]
    assert "12/40" in shown and "ETA 2m10s" in shown and "best val_accuracy" in shown
    assert "…" in shown and "momentum" not in shown  # the parameters give way, not the count


@pytest.mark.parametrize("args", [SEARCH, COMPARE], ids=["search", "compare"])
@pytest.mark.parametrize("quiet", [False, True], ids=["piped", "quiet"])
def test_piped_or_quiet_gets_one_plain_line_per_unit(invoke, args, quiet):
    result = invoke(*args, *(["-q"] if quiet else []))
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.output.splitlines() if line.startswith("[") and "·" in line]
    assert [line.split("]")[0] for line in lines] == ["[1/2", "[2/2"]
    assert "ETA 0.0s" in lines[1] and "best " in lines[1] and "\x1b[" not in result.output
    assert ("┏" in result.output) is not quiet  # the summary table only when not quiet


def test_search_dry_run_prints_the_plan_and_an_estimate_and_touches_no_store(invoke, tmp_path):
    store, study = tmp_path / "store", tmp_path / "study.db"
    result = invoke("search", "--space", "lr=loguniform:1e-3:1e-1", "--space", "epochs=int:2:4", "--cv", "3",
                    "--n-trials", "4", "--target", "val_accuracy=0.9", "--storage", f"sqlite:///{study}",
                    "--tracking-uri", f"sqlite:///{store}/mlflow.db", "--model", "mlp:hidden=[16]", "--dry-run",
                    store=False)
    assert result.exit_code == 0, result.stderr
    out = result.output
    assert "4 trials x 3 folds = 12 trainings" in out and "stops at --target val_accuracy=0.9" in out
    assert "lr = loguniform:0.001:0.1" in out and "epochs = int:2:4" in out
    assert "calibration (one epoch, nothing logged)" in out and "estimated total:" in out
    assert "12 trainings of 3 epochs and the refit, without pruning; each trial's 3 folds at once (stacked)" in out
    assert not store.exists() and not study.exists() and not (tmp_path / "mlruns").exists()


def test_search_dry_run_leaves_a_shared_study_untouched(invoke, tmp_path):
    import optuna

    study = tmp_path / "study.db"
    optuna.create_study(storage=f"sqlite:///{study}", study_name="shared")
    before = study.read_bytes()
    result = invoke("search", "--space", "lr=loguniform:1e-3:1e-1", "--storage", f"sqlite:///{study}",
                    "--study-name", "shared", "--budget", "1s", "--dry-run", *TINY, "--n-trials", "1000",
                    store=False)  # 1,000 trials: an estimate over the 1 s budget on any machine
    assert result.exit_code == 0, result.stderr
    assert "capped by --budget" in result.output and "estimated total: 1.0s" in result.output
    assert "stacked" not in result.output  # no --cv: one training per trial
    assert study.read_bytes() == before and not (tmp_path / "mlruns").exists()


def test_search_dry_run_lists_the_budget_and_warns_when_it_is_shorter_than_one_trial(invoke, tmp_path):
    result = invoke("search", "--space", "lr=loguniform:1e-3:1e-1", "--budget", "0.01s", "--dry-run", *TINY,
                    store=False)
    assert result.exit_code == 0, result.stderr
    assert "stops at --budget 0.0s" in result.output
    assert "warning: --budget of 0.0s is shorter than one trial (about " in result.output
    roomy = invoke("search", "--space", "lr=loguniform:1e-3:1e-1", "--budget", "1h", "--dry-run", *TINY, store=False)
    assert "stops at --budget 1h00m" in roomy.output and "warning" not in roomy.output


def test_search_dry_run_counts_the_trials_a_shared_study_already_finished(invoke, tmp_path):
    import optuna

    study = tmp_path / "study.db"
    shared = optuna.create_study(storage=f"sqlite:///{study}", study_name="shared")
    shared.optimize(lambda trial: trial.suggest_float("lr", 1e-3, 1e-1), n_trials=2)
    before = study.read_bytes()
    args = ("search", "--space", "lr=loguniform:1e-3:1e-1", "--storage", f"sqlite:///{study}", "--n-trials", "5",
            "--dry-run", *TINY)
    result = invoke(*args, "--study-name", "shared", store=False)
    assert result.exit_code == 0, result.stderr
    assert "study shared holds 2 finished trials, 3 left to run" in result.output
    assert "5 trials (2 already finished) = 3 trainings" in result.output and "3 trainings of 1 epochs" in result.output
    other = invoke(*args, "--study-name", "other", store=False)  # no such study: every trial is to run
    assert "5 trainings of 1 epochs" in other.output and "finished trials" not in other.output
    assert study.read_bytes() == before and not (tmp_path / "mlruns").exists()


def test_compare_dry_run_prints_the_runs_and_an_estimate_and_touches_no_store(invoke, tmp_path):
    result = invoke("compare", "--vary", "opt=sgd,adam", "--vary", "lr=0.1,0.01", "--repeats", "3", "--epochs", "2",
                    "--out", str(tmp_path / "out"), "--dry-run", store=False)
    assert result.exit_code == 0, result.stderr
    assert "12 runs: 4 variants x 3 seeds" in result.output and "opt=adam lr=0.01" in result.output
    assert "12 trainings of 2 epochs at variant opt=sgd lr=0.1's cost" in result.output
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "out").exists()


def test_compare_dry_run_says_which_runs_it_would_reuse_and_leaves_them_out_of_the_estimate(invoke, tmp_path):
    first = invoke("compare", "--vary", "opt=sgd,rmsprop", *TINY, "--out", str(tmp_path / "a"), "-q")
    assert first.exit_code == 0, first.stderr
    result = invoke("compare", "--vary", "opt=sgd,adam,rmsprop", *TINY, "--out", str(tmp_path / "b"), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "reused 2 of 3 runs" in result.output and "1 trainings of 1 epochs" in result.output
    assert not (tmp_path / "b").exists()
    fresh = invoke("compare", "--vary", "opt=sgd,adam,rmsprop", *TINY, "--no-reuse", "--dry-run")
    assert "reused" not in fresh.output and "3 trainings of 1 epochs" in fresh.output


def test_dry_run_refuses_bad_input_like_the_real_command(invoke, tmp_path):
    result = invoke("compare", "--vary", "opt=sgd,nosuchopt", "--dry-run", store=False)
    assert result.exit_code == 2 and "nosuchopt" in result.stderr
    assert not (tmp_path / "mlruns").exists()


def test_a_compare_tick_leaves_reused_runs_out_of_the_eta_and_names_the_best():
    from optiflow.commands.compare import ChildRun, run_tick

    children = [ChildRun("opt=sgd", 0, "FINISHED", "a", {"test_accuracy": 0.9}, reused=True),
                ChildRun("opt=adam", 0, "FINISHED", "b", {"test_accuracy": 0.95}),
                ChildRun("opt=rmsprop", 0, "FAILED", failure="diverged")]
    tick = run_tick(children, 1.0, [4.0, 1.0], total=6, metric=None)  # the reused run's 0.01 s is not a duration
    assert (tick.done, tick.total, tick.eta) == (3, 6, 7.5)
    assert tick.what == "opt=rmsprop seed=0 failed: diverged"
    assert tick.best == "test_accuracy=0.95 (opt=adam seed=0)"
    assert run_tick(children[:1], 0.01, [], total=6, metric="test_accuracy").what.endswith("0.9 (reused)")
