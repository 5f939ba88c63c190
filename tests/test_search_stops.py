"""Where a search stops (--target, --budget, --n-trials, --timeout, Ctrl-C) and why, read from the study's
storage so that every worker sharing --storage stops; the parent run records the reason."""

from __future__ import annotations

import contextlib
import datetime
import subprocess
import sys
import time

import optuna
import pytest

from optiflow import hookimpl
from optiflow.commands.search import settings_from
from optiflow.config import RunConfig
from optiflow.search.stopping import stop_reason, target_trial, trial_tick
from optiflow.search.study import SearchSettings

from helpers import runs_of

TINY = ("--model", "mlp:hidden=[16]", "--batch-size", "64", "--no-refit")
SPACE = ("--space", "lr=loguniform:0.02:0.1", "--sampler", "random", "--sampler-seed", "1")


def parent_of(client, experiment: str):
    [parent] = [r for r in runs_of(client, experiment) if r.data.tags.get("optiflow.kind") == "search"]
    return parent


def trial_numbers(client, experiment: str) -> list[int]:
    return sorted(int(r.data.tags["optuna.trial_number"]) for r in runs_of(client, experiment)
                  if "optuna.trial_number" in r.data.tags)


def test_a_reached_target_stops_the_study_and_the_summary_names_the_trial(invoke, mlflow_client, experiment):
    result = invoke("search", *SPACE, "--n-trials", "5", "--epochs", "2", "--target", "val_accuracy=0.3", *TINY)
    assert result.exit_code == 0, result.stderr
    assert trial_numbers(mlflow_client, experiment) == [0]  # every trial reaches 0.3: none after the first
    parent = parent_of(mlflow_client, experiment)
    assert parent.data.params["metric"] == "val_accuracy" and parent.data.params["direction"] == "maximize"
    assert float(parent.data.params["target"]) == 0.3
    assert parent.data.tags["stop_reason"] == "target"
    assert parent.data.tags["stop_detail"].startswith("trial 0 reached val_accuracy=")
    assert "stopped (target): trial 0 reached val_accuracy=" in result.output


def test_an_unreached_target_runs_every_trial_and_says_trials(invoke, mlflow_client, experiment):
    """A loss metric is reached from above: val_loss=0 is never reached, so --n-trials ends the study."""
    result = invoke("search", *SPACE, "--n-trials", "2", "--epochs", "1", "--target", "val_loss=0", *TINY)
    assert result.exit_code == 0, result.stderr
    assert trial_numbers(mlflow_client, experiment) == [0, 1]
    parent = parent_of(mlflow_client, experiment)
    assert parent.data.tags["stop_reason"] == "trials" and "2 finished trials" in parent.data.tags["stop_detail"]


def test_a_target_reached_by_another_worker_in_storage_starts_no_trial(invoke, mlflow_client, experiment, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="shared", direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.05}, value=0.97, distributions={
        "lr": optuna.distributions.FloatDistribution(0.02, 0.1, log=True)}))
    result = invoke("search", *SPACE, "--n-trials", "5", "--epochs", "1", "--storage", storage,
                    "--study-name", "shared", "--target", "val_accuracy=0.95", *TINY)
    assert result.exit_code == 0, result.stderr
    assert "trial 0 reached the target val_accuracy=0.95: no new trial" in result.output
    assert len(optuna.load_study(study_name="shared", storage=storage).trials) == 1
    assert trial_numbers(mlflow_client, experiment) == []
    assert parent_of(mlflow_client, experiment).data.tags["stop_reason"] == "target"


def test_the_budget_lets_the_trial_in_flight_finish_and_starts_no_other(invoke, mlflow_client, experiment, plugin):
    """The first trial's epoch outlasts the budget: it completes (never left RUNNING), no trial follows."""
    budget = 6.0
    start = time.time()

    class Slow:
        @hookimpl
        def optiflow_epoch_end(self, run, epoch, metrics):
            time.sleep(max(0.0, start + budget + 0.5 - time.time()))

    plugin(Slow(), "slow")
    result = invoke("search", *SPACE, "--n-trials", "50", "--epochs", "2", "--budget", f"{budget:g}s", *TINY)
    assert result.exit_code == 0, result.stderr
    assert time.time() - start < budget + 30
    runs = [r for r in runs_of(mlflow_client, experiment) if "optuna.trial_number" in r.data.tags]
    assert [(r.data.tags["optuna.trial_number"], r.info.status) for r in runs] == [("0", "FINISHED")]
    parent = parent_of(mlflow_client, experiment)
    assert parent.data.tags["stop_reason"] == "budget" and parent.info.status == "FINISHED"
    assert float(parent.data.params["budget_seconds"]) == budget
    assert "stopped (budget)" in result.output


def test_ctrl_c_records_interrupted_on_the_parent(invoke, mlflow_client, experiment, plugin):
    class Interrupt:
        @hookimpl
        def optiflow_epoch_end(self, run, epoch, metrics):
            raise KeyboardInterrupt

    plugin(Interrupt(), "interrupt")
    result = invoke("search", *SPACE, "--n-trials", "3", "--epochs", "1", *TINY, "-q")
    assert result.exit_code == 130
    parent = parent_of(mlflow_client, experiment)
    assert parent.info.status == "KILLED" and parent.data.tags["stop_reason"] == "interrupted"


def test_an_interrupted_search_logs_its_trials_table_but_no_plots_and_ends_at_once(invoke, mlflow_client, experiment,
                                                                                  plugin):
    """Ctrl-C in the third trial: the two complete trials are in trials.csv, and the search ends without waiting
    for Optuna's plots to be drawn (as before they were drawn beside the search)."""
    trials: set[int] = set()

    class Interrupt:
        @hookimpl
        def optiflow_epoch_end(self, run, epoch, metrics):
            trials.add(id(run))
            if len(trials) == 3:
                raise KeyboardInterrupt

    plugin(Interrupt(), "interrupt")
    result = invoke("search", *SPACE, "--n-trials", "5", "--epochs", "1", *TINY, "-q")
    assert result.exit_code == 130
    parent = parent_of(mlflow_client, experiment)
    assert parent.info.status == "KILLED" and parent.data.tags["stop_reason"] == "interrupted"
    logged = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}
    assert "trials.csv" in logged and not any(name.endswith(".png") for name in logged), logged
    assert parent.data.metrics["n_complete"] == 2


def test_an_interrupted_trial_says_to_run_the_search_again_not_train_resume(invoke, mlflow_client, experiment, plugin):
    class Interrupt:
        @hookimpl
        def optiflow_epoch_end(self, run, epoch, metrics):
            if epoch >= 2:  # after the first epoch's checkpoint
                raise KeyboardInterrupt

    plugin(Interrupt(), "interrupt")
    result = invoke("search", *SPACE, "--n-trials", "2", "--epochs", "3", *TINY)
    assert result.exit_code == 130
    assert "checkpoint of epoch" in result.stderr and "run the same search command again" in result.stderr
    assert "--resume" not in result.stderr


#: runs optiflow with SIGINT ignored (as a shell's ``&`` starts it) and sends itself SIGINT once a run has ended
BACKGROUND = "\n".join([
    "import os, signal, sys",
    "from optiflow.cli import main",
    "from optiflow.tracking import Tracker",
    "signal.signal(signal.SIGINT, signal.SIG_IGN)",
    "ended = Tracker.end",  # a run ends (on a SQL store in one transaction with its last metrics, not set_terminated)
    "def end(self, *args, **kwargs):",
    "    ended(self, *args, **kwargs)",
    "    os.kill(os.getpid(), signal.SIGINT)",
    "Tracker.end = end",
    "sys.argv = ['optiflow', *sys.argv[1:]]",
    "main()",
])


@pytest.mark.parametrize("command", [
    ("search", *SPACE, "--n-trials", "3", "--cv", "2", "--pruner", "none", *TINY),  # folds trained stacked
    ("compare", "--vary", "opt=sgd,adam", *TINY[:4]),
])
def test_kill_int_stops_a_background_search_as_it_stops_compare(command, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-c", BACKGROUND, *command, "--epochs", "1", "--tracking-uri", store],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stdout + done.stderr
    assert "interrupted by SIGINT" in done.stderr and "Traceback" not in done.stderr


def test_a_budget_spent_before_any_trial_finished_says_so_and_exits_1(invoke, mlflow_client, experiment):
    """A search that ran no trial is not a success: one clear line, exit 1, no empty summary."""
    result = invoke("search", *SPACE, "--n-trials", "3", "--epochs", "1", "--budget", "0.001s", *TINY)
    assert result.exit_code == 1
    assert "the budget ended before any trial finished" in result.stderr and "Traceback" not in result.stderr
    assert "no trial finished" in result.output and "┏" not in result.output  # no empty table
    parent = parent_of(mlflow_client, experiment)
    assert parent.info.status == "FAILED" and parent.data.tags["stop_reason"] == "budget"
    assert trial_numbers(mlflow_client, experiment) == []


@pytest.mark.parametrize(("args", "message"), [
    (("--target", "val_accuracy=high"), "--target expects METRIC=VALUE"),
    (("--target", "val_accuracy=0.9", "--metric", "val_loss"), "--target names val_accuracy but the objective"),
    (("--budget", "ten minutes"), "--budget expects a wall time"),
    (("--budget", "0s"), "--budget expects a wall time"),
    (("--budget", ""), "--budget expects a wall time"),  # not read as "no budget"
    (("--budget", "1h99m"), "--budget expects a wall time"),  # 99 minutes are not a part of an hour
    (("--budget", "30m1h"), "--budget expects a wall time"),
])
def test_bad_target_or_budget_is_one_line_exit_2_and_no_run(invoke, mlflow_client, experiment, args, message):
    result = invoke("search", *SPACE, "--n-trials", "2", "--epochs", "1", *args, *TINY)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert mlflow_client.get_experiment_by_name(experiment) is None


def test_a_bare_target_is_a_value_of_the_default_objective():
    """docs/search.md: a bare ``--target 0.98`` is a value of ``--metric``, or of its default when none is given."""
    base = RunConfig()
    assert settings_from({"target": "0.98", "space": SPACE[1:2]}, base).target == 0.98
    assert settings_from({"target": "0.98", "space": SPACE[1:2]}, base).metric == SearchSettings.metric
    assert settings_from({"target": "0.2", "metric": "val_loss", "space": SPACE[1:2]}, base).metric == "val_loss"


def _trial(number: int, state: str, value: float | None, seconds: float, finished_at: int) -> optuna.trial.FrozenTrial:
    end = datetime.datetime(2026, 1, 1) + datetime.timedelta(seconds=finished_at)
    return optuna.trial.FrozenTrial(
        number=number, state=optuna.trial.TrialState[state], value=value, values=None,
        datetime_start=end - datetime.timedelta(seconds=seconds), datetime_complete=end, params={"lr": 0.1},
        distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1.0)}, user_attrs={}, system_attrs={},
        intermediate_values={}, trial_id=number)


def _study(*trials: optuna.trial.FrozenTrial, direction: str = "maximize") -> optuna.Study:
    study = optuna.create_study(direction=direction)
    for trial in trials:
        study.add_trial(trial)
    return study


def test_the_target_trial_is_the_first_to_reach_it_by_completion_in_the_study_direction():
    settings = SearchSettings(space=[], metric="val_accuracy", direction="maximize", target=0.9)
    study = _study(_trial(0, "COMPLETE", 0.95, 5, finished_at=30), _trial(1, "COMPLETE", 0.97, 5, finished_at=20),
                   _trial(2, "COMPLETE", 0.5, 5, finished_at=10))
    assert target_trial(study, settings).number == 1  # completed first, although numbered later
    lower = SearchSettings(space=[], metric="val_loss", direction="minimize", target=0.2)
    assert target_trial(_study(_trial(0, "COMPLETE", 0.3, 1, 1), direction="minimize"), lower) is None
    assert target_trial(_study(_trial(0, "COMPLETE", 0.1, 1, 1), direction="minimize"), lower).number == 0


def test_stop_reason_from_the_study_and_the_clock():
    base = SearchSettings(space=[], metric="val_accuracy", direction="maximize", n_trials=3)
    two = _study(_trial(0, "COMPLETE", 0.5, 5, 1), _trial(1, "PRUNED", None, 1, 2))
    assert stop_reason(two, SearchSettings(**{**vars(base), "target": 0.4}), elapsed=1).reason == "target"
    assert stop_reason(_study(*two.trials, _trial(2, "COMPLETE", 0.6, 5, 3)), base, elapsed=1).reason == "trials"
    budget = SearchSettings(**{**vars(base), "budget": 60.0, "deadline": 1000.0})
    assert stop_reason(two, budget, elapsed=70, now=1001).reason == "budget"
    assert stop_reason(two, budget, elapsed=70, now=999).reason == "trials"  # not spent: this worker's share ran
    timeout = SearchSettings(**{**vars(base), "timeout": 10.0})
    assert stop_reason(two, timeout, elapsed=11).reason == "timeout"


def test_the_trial_tick_counts_a_pruned_trial_as_what_it_cost():
    settings = SearchSettings(space=[], metric="val_accuracy", direction="maximize", n_trials=5)
    study = _study(_trial(0, "COMPLETE", 0.5, 10, 10), _trial(1, "PRUNED", None, 2, 12),
                   _trial(2, "COMPLETE", 0.7, 10, 22))
    tick = trial_tick(study, study.trials[2], settings, "trial 2 complete")
    assert (tick.done, tick.total, tick.seconds) == (3, 5, 10.0)
    assert tick.eta == pytest.approx(2 * 22 / 3)  # 2 trials left at the mean of 10, 2 and 10 s
    assert tick.best == "val_accuracy=0.7 (trial 2: lr=0.1)"
    capped = trial_tick(study, study.trials[2], SearchSettings(**{**vars(settings), "deadline": time.time() + 5}),
                        "trial 2 complete")
    assert 0 < capped.eta <= 5  # never beyond what is left of the budget


def test_two_workers_on_sqlite_stop_at_the_target_and_show_the_study_wide_count(tmp_path, tracking_uri, experiment,
                                                                                  mlflow_client):
    """Each worker stops after the trial it has in flight once any trial reached the target; their plain
    progress lines count the study's finished trials, the other worker's too."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = [sys.executable, "-m", "optiflow", "search", *SPACE, "--n-trials", "20", "--epochs", "2",
               "--storage", storage, "--study-name", "shared", "--target", "val_accuracy=0.3",
               "--tracking-uri", tracking_uri, "--experiment", experiment, *TINY]
    processes = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]
    study = optuna.load_study(study_name="shared", storage=storage)
    assert 1 <= len(study.trials) <= 2 and {t.state.name for t in study.trials} == {"COMPLETE"}
    parent = parent_of(mlflow_client, experiment)
    assert parent.info.status == "FINISHED" and parent.data.tags["stop_reason"] == "target"
    lines = [line for out, _ in outputs for line in out.splitlines() if line.startswith("[")]
    counts = [int(line[1:].split("/")[0]) for line in lines]
    assert len(counts) == len(study.trials) and max(counts) == len(study.trials)  # 2: one worker counted the other's
    assert all("ETA" in line and "best val_accuracy=" in line for line in lines)


def test_the_time_limit_is_the_timeout_cut_to_what_is_left_of_the_budget():
    from optiflow.search.stopping import time_limit

    assert time_limit(SearchSettings(space=[])) is None
    assert time_limit(SearchSettings(space=[], timeout=30.0)) == 30.0
    assert time_limit(SearchSettings(space=[], timeout=30.0, deadline=1010.0), now=1000.0) == 10.0
    assert time_limit(SearchSettings(space=[], deadline=1010.0), now=1020.0) == -10.0  # spent: no trial starts


@pytest.mark.parametrize(("text", "metric", "expected"), [
    ("val_accuracy=0.98", None, ("val_accuracy", 0.98)), ("0.98", "val_accuracy", ("val_accuracy", 0.98)),
    (" val_loss = 0.05 ", "val_loss", ("val_loss", 0.05)), ("val_r2=-1e-2", None, ("val_r2", -0.01))])
def test_parse_target(text, metric, expected):
    from optiflow.search.stopping import parse_target

    assert parse_target(text, metric) == expected


@pytest.mark.parametrize("text", ["val_accuracy=", "=0.9", "val_accuracy=nan", "val_accuracy=inf"])
def test_parse_target_refuses(text):
    from optiflow.errors import OptiflowError
    from optiflow.search.stopping import parse_target

    with pytest.raises(OptiflowError, match="--target expects METRIC=VALUE"):
        parse_target(text, None)


def test_a_stopped_study_leaves_dead_workers_retries_queued_instead_of_spinning(tmp_path, tracking_uri):
    """settle() runs the retries of dead workers' trials; once the target is reached none may start, and
    settle must return rather than loop on the queued retry."""
    import threading

    from optiflow.config import RunConfig
    from optiflow.search.objective import run_trials
    from optiflow.search.workers import heartbeat_options, settle

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", **heartbeat_options(1, tracking_uri))
    study = optuna.create_study(storage=storage, study_name="stopped", direction="maximize")
    study.add_trial(_trial(0, "COMPLETE", 0.99, 1, 1))
    study.enqueue_trial({"lr": 0.1})
    settings = SearchSettings(space=[], metric="val_accuracy", direction="maximize", target=0.9)
    assert run_trials(RunConfig(), settings, study, "parent", 1) is False
    worker = threading.Thread(target=settle, args=(study, lambda n: run_trials(RunConfig(), settings, study,
                                                                               "parent", n), None), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert [t.state.name for t in study.trials] == ["COMPLETE", "WAITING"]


def test_sigterm_to_the_search_alone_stops_its_workers_at_once_and_their_runs_end_killed(tmp_path):
    """``kill PID`` (a service manager's stop) reaches the search's process only: its workers are sent SIGTERM as
    it stops, not waited for while they train on (10 s each, then terminated: past a manager's own grace)."""
    import os
    import signal

    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    search = subprocess.Popen([sys.executable, "-m", "optiflow", "search", *SPACE, "--n-trials", "2", "--n-jobs", "2",
                               "--epochs", "100000", *TINY, "--tracking-uri", store, "--experiment", "term"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(tmp_path)})
    client = mlflow.MlflowClient(store)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and search.poll() is None:
            with contextlib.suppress(Exception):
                runs = client.search_runs([client.get_experiment_by_name("term").experiment_id])
                if sum("optuna.trial_number" in r.data.tags and r.info.status == "RUNNING" for r in runs) == 2:
                    break
            time.sleep(0.5)
        time.sleep(2)  # both train
        search.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = search.communicate(timeout=60)
    finally:
        search.kill()
    assert time.monotonic() - sent < 8, "the workers were waited for while they trained on"
    assert search.returncode == 143 and "Traceback" not in err, err
    runs = client.search_runs([client.get_experiment_by_name("term").experiment_id])
    assert sorted(r.info.status for r in runs) == ["KILLED"] * 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("optiflow-study-")] == []


def _stuck() -> None:
    """A worker stuck where no signal handler runs (a C call retrying a lost store, say)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def test_stuck_workers_are_waited_for_the_grace_once_not_once_each(monkeypatch):
    """Ctrl-C with --n-jobs 4 and every worker stuck: the search ends after the grace twice (the wait, then the
    wait after SIGTERM), not twice per worker."""
    import multiprocessing

    from optiflow.search import objective

    monkeypatch.setattr(objective, "WORKER_GRACE_SECONDS", 1.0)
    workers = [multiprocessing.get_context("fork").Process(target=_stuck, daemon=True) for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(0.2)
    started = time.monotonic()
    objective._stop_workers(workers, interrupted=True)
    assert time.monotonic() - started < 3.5
    assert not any(worker.is_alive() for worker in workers)


def test_workers_started_before_one_could_not_start_are_stopped(monkeypatch):
    """A worker that cannot start (no process left: EAGAIN) after others did: those are stopped with the search,
    not left writing to the study's temporary journal the search removes."""
    import errno
    import multiprocessing.context

    from optiflow.search import objective

    started, stopped = [], []

    def start(process):
        if started:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        started.append(process)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start)
    monkeypatch.setattr(objective, "_stop_workers", lambda workers, interrupted: stopped.extend(workers))
    study = optuna.create_study(direction="minimize")
    settings = SearchSettings(space=[], n_trials=3, n_jobs=3)
    with pytest.raises(OSError):
        objective.run_study(RunConfig(), settings, study, "parent")
    assert started and stopped == started
