"""Figures drawn beside the run (optiflow/drawing.py): a helper process draws a run's figures while the run
exports its model; the run's process never imports matplotlib for them, and whatever goes wrong with the helper
(an error, a crash, a hang, a helper that cannot start) leaves the run drawing the figure itself, with the
error it always had.  A process killed mid-run leaves no figures behind in the temporary folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from optiflow import drawing
from optiflow.drawing import Recipe
from optiflow.tracking import Tracker

from helpers import run_cli, runs_of

ROOT = Path(__file__).resolve().parent.parent
FIGURES = textwrap.dedent("""
    import os
    import time

    from optiflow.plots import pyplot

    def line(values, title="line"):
        figure, axis = pyplot().subplots(figsize=(3, 2))
        axis.plot(values)
        axis.set_title(title)
        return figure

    def broken(reason):
        raise ValueError(reason)

    def slow_beside(values, seconds, parent):
        if os.getpid() != parent:  # the helper only: the run's own process draws at once
            time.sleep(seconds)
        return line(values)
""")


@pytest.fixture
def figures(tmp_path, monkeypatch):
    """A module of figure functions that only this test's path holds (the helper learns it from the request)."""
    (tmp_path / "my_figures.py").write_text(FIGURES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_figures"


@pytest.fixture
def tracker(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "figures")
    tracker.start("drawn")
    yield tracker
    tracker.end()


def artifact_bytes(tracker: Tracker, name: str, tmp_path: Path) -> bytes:
    return Path(tracker.client.download_artifacts(tracker.run_id, name, str(tmp_path))).read_bytes()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_a_default_run_logs_its_figures_drawn_by_the_helper_without_importing_matplotlib(tmp_path):
    """`optiflow train` as a user runs it: both figures are logged, as PNGs of the sizes they always had, and
    the command's own process never imported matplotlib (the helper drew them)."""
    script = ("import atexit, sys; atexit.register(lambda: print('matplotlib imported:', 'matplotlib' in sys.modules)); "
              "sys.argv = ['optiflow', 'train', '--epochs', '2', '-q', '--experiment', 'beside']; "
              "from optiflow.cli import main; main()")
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**environment, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "matplotlib imported: False" in done.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    [run] = runs_of(client, "beside")
    sizes = {name: png_size(Path(client.download_artifacts(run.info.run_id, name, str(tmp_path))).read_bytes())
             for name in ("learning_curves.png", "gradient_flow.png")}
    assert sizes == {"learning_curves.png": (1000, 400), "gradient_flow.png": (550, 400)}


def test_a_recipe_is_logged_under_its_artifact_path(tracker, figures, tmp_path):
    tracker.log_figure(Recipe(f"{figures}:line", {"values": [1, 3, 2], "title": "drawn beside"}), "plots/line.png")
    tracker.collect_figures()
    assert png_size(artifact_bytes(tracker, "plots/line.png", tmp_path)) == (300, 200)
    assert tracker.drawer.staging is None, "the run's temporary figures are removed once logged"


def test_a_figure_the_helper_cannot_draw_raises_its_own_error_in_the_run(tracker, figures):
    tracker.prepare_figures()
    tracker.log_figure(Recipe(f"{figures}:broken", {"reason": "no data to draw"}), "broken.png")
    tracker.log_figure(Recipe(f"{figures}:line", {"values": [1, 2]}), "line.png")
    started = time.monotonic()
    with pytest.raises(ValueError, match="no data to draw"):
        tracker.collect_figures()
    assert time.monotonic() - started < drawing.WAIT_SECONDS / 2, "the helper said it failed: no waiting it out"
    assert [a.path for a in tracker.client.list_artifacts(tracker.run_id)] == ["line.png"], "the others are logged"


def test_a_helper_that_died_leaves_the_run_drawing_the_figure(tracker, figures, tmp_path):
    tracker.prepare_figures()
    helper = drawing._HELPER_PROCESS.process
    assert helper is not None
    helper.kill()
    helper.wait()
    tracker.log_figure(Recipe(f"{figures}:line", {"values": [1, 2]}), "line.png")
    tracker.collect_figures()
    assert png_size(artifact_bytes(tracker, "line.png", tmp_path)) == (300, 200)
    tracker.prepare_figures()
    assert drawing._HELPER_PROCESS.process is not helper and drawing._HELPER_PROCESS.alive(), "a new helper"


def test_a_helper_that_cannot_start_leaves_the_run_drawing_the_figure(tracker, figures, tmp_path, monkeypatch):
    drawing._HELPER_PROCESS.stop()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    tracker.prepare_figures()
    assert drawing._HELPER_PROCESS.process is None
    tracker.log_figure(Recipe(f"{figures}:line", {"values": [1, 2]}), "line.png")
    tracker.collect_figures()
    assert png_size(artifact_bytes(tracker, "line.png", tmp_path)) == (300, 200)


def test_a_helper_that_hangs_is_stopped_and_the_run_draws_the_figure(tracker, figures, tmp_path, monkeypatch):
    monkeypatch.setattr(drawing, "WAIT_SECONDS", 1.0)
    tracker.prepare_figures()
    helper = drawing._HELPER_PROCESS.process
    tracker.log_figure(Recipe(f"{figures}:slow_beside", {"values": [1, 2], "seconds": 120, "parent": os.getpid()}),
                       "slow.png")
    started = time.monotonic()
    tracker.collect_figures()
    assert time.monotonic() - started < 30
    assert png_size(artifact_bytes(tracker, "slow.png", tmp_path)) == (300, 200)
    assert helper is not None and helper.poll() is not None, "the hung helper is killed"


def test_recipe_arguments_must_be_json_values(tracker):
    with pytest.raises(TypeError, match="arguments of figure 'm:f' must be JSON values"):
        tracker.log_figure(Recipe("m:f", {"values": {1, 2}}), "f.png")


def test_a_run_that_ends_logs_the_figures_it_was_still_drawing(tmp_path, figures):
    """No explicit collection (a run that fails or is stopped): ending the run waits for its figures and
    logs them, then ends it."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "figures")
    tracker.start("stopped")
    tracker.log_figure(Recipe(f"{figures}:slow_beside", {"values": [1], "seconds": 1, "parent": os.getpid()}),
                       "late.png")
    tracker.log_figure(Recipe(f"{figures}:broken", {"reason": "x"}), "broken.png")
    tracker.end("KILLED")
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert [a.path for a in tracker.client.list_artifacts(tracker.run_id)] == ["late.png"]


def test_a_process_killed_while_its_figure_is_drawn_leaves_nothing_behind(tmp_path, figures):
    """SIGKILL the run's process while the helper draws: the helper finishes, removes the run's temporary
    figures and exits (its input ended), so no process and no folder is left."""
    script = _slow_figure_script(tmp_path, 1, "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == -signal.SIGKILL, done.stderr
    helper, staging = json.loads(done.stdout)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (Path(staging).exists() or _alive(helper)):
        time.sleep(0.1)
    assert not Path(staging).exists(), "the killed run's figures are removed"
    assert not _alive(helper), "the helper ends with the run's process"


def _slow_figure_script(tmp_path: Path, seconds: float, then: str) -> str:
    """A process that asks for a figure the helper draws in ``seconds``, prints the helper's pid and the run's
    staging folder, then runs ``then``."""
    return textwrap.dedent(f"""
        import json, os, signal, sys, threading
        sys.path.insert(0, {str(tmp_path)!r})
        from optiflow import drawing
        drawer = drawing.Drawer()
        drawer.draw(drawing.Recipe("my_figures:slow_beside", {{"values": [1], "seconds": {seconds}, "parent": os.getpid()}}),
                    "slow.png")
        print(json.dumps([drawing._HELPER_PROCESS.process.pid, str(drawer.staging)]), flush=True)
    """) + textwrap.dedent(then)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return status != "Z"


def test_runs_in_one_process_share_one_helper(invoke, mlflow_client, experiment):
    for seed in ("1", "2"):
        assert invoke("train", "--epochs", "1", "--seed", seed, "-q").exit_code == 0
        if seed == "1":
            first = drawing._HELPER_PROCESS.process
    assert first is not None and drawing._HELPER_PROCESS.process is first
    for run in runs_of(mlflow_client, experiment):
        assert {"learning_curves.png", "gradient_flow.png"} <= {a.path for a in mlflow_client.list_artifacts(
            run.info.run_id)}


def test_ctrl_c_at_the_terminal_does_not_stop_the_helper(tmp_path):
    """The helper is in its own session: a SIGINT to the run's process group reaches the run only."""
    drawing._HELPER_PROCESS.start()
    helper = drawing._HELPER_PROCESS.process
    assert helper is not None
    assert os.getsid(helper.pid) == helper.pid != os.getsid(0)
    assert run_cli("--help").returncode == 0


def test_the_search_plots_are_drawn_beside_it_and_one_that_cannot_be_is_a_tag_saying_why(tracker, tmp_path):
    """The search's plots are drawn from a copy of its trials: the same figures, logged once drawn; a plot that
    cannot be drawn (here a copied trial Optuna refuses) is the ``plot.<file>`` tag it always was."""
    from types import SimpleNamespace

    import optuna

    from optiflow.search.summary import _log_plots, log_plots_drawn

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True) + t.suggest_int("width", 1, 9), n_trials=6)
    _log_plots(tracker, study, SimpleNamespace(metric="val_loss", pruner="median"), complete=6)
    refused = {"state": "COMPLETE", "value": 1.0, "params": {"lr": 5.0}, "intermediate": {},
               "distributions": {"lr": optuna.distributions.distribution_to_json(
                   optuna.distributions.FloatDistribution(1e-4, 1e-1))}}
    tracker.log_figure(Recipe("optiflow.plots:study_plot", {
        "artifact": "optimization_history.png", "trials": [refused], "metric": "val_loss", "complete": 1,
        "direction": "minimize"}), "refused.png")
    log_plots_drawn(tracker)
    tags = tracker.client.get_run(tracker.run_id).data.tags
    assert tags["plot.refused.png"].startswith("not drawn: ") and "lr" in tags["plot.refused.png"]
    logged = [a.path for a in tracker.client.list_artifacts(tracker.run_id)]
    assert logged == ["intermediate_values.png", "optimization_history.png", "param_importances.png"]
    assert png_size(artifact_bytes(tracker, "param_importances.png", tmp_path)) == (800, 500)


def _interrupt_the_wait(monkeypatch) -> None:
    """The next sleep while a run waits for its figures is a Ctrl-C (RunInterrupted, as InterruptGuard raises)."""
    from optiflow.errors import RunInterrupted

    sleep = time.sleep

    def interrupted(seconds: float) -> None:
        monkeypatch.setattr(drawing.time, "sleep", sleep)
        raise RunInterrupted(signal.SIGINT)

    monkeypatch.setattr(drawing.time, "sleep", interrupted)


def test_ctrl_c_while_a_run_waits_for_its_figures_leaves_them_to_its_end(tmp_path, figures, monkeypatch):
    """Ctrl-C while the finished run waits for its figures (after its export): the run ends KILLED and
    still logs the figures the helper drew, as the run's end collects them."""
    from optiflow.errors import RunInterrupted

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "figures")
    tracker.start("stopped")
    tracker.log_figure(Recipe(f"{figures}:slow_beside", {"values": [1], "seconds": 0.5, "parent": os.getpid()}),
                       "late.png")
    _interrupt_the_wait(monkeypatch)
    with pytest.raises(RunInterrupted):
        tracker.collect_figures()
    tracker.end("KILLED")
    assert tracker.client.get_run(tracker.run_id).info.status == "KILLED"
    assert [a.path for a in tracker.client.list_artifacts(tracker.run_id)] == ["late.png"]
    assert tracker.drawer.staging is None


def test_ctrl_c_while_the_run_ends_stops_the_wait_not_the_end(tmp_path, figures, monkeypatch):
    """A Ctrl-C while the run's end waits for its figures gives up the figures not yet drawn, not the run: the
    figures drawn, its metrics and its status are written, the temporary figures removed, and the interruption
    goes on."""
    from optiflow.errors import RunInterrupted

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "figures")
    tracker.start("stopped")
    tracker.log_metrics({"train_seconds": 3.0}, step=1, flush=False)
    tracker.log_figure(Recipe(f"{figures}:line", {"values": [1, 2]}), "drawn.png")
    tracker.log_figure(Recipe(f"{figures}:slow_beside", {"values": [1], "seconds": 5, "parent": os.getpid()}),
                       "late.png")
    staging = tracker.drawer.staging
    drawn = tracker.drawer.queued[0][1]
    deadline = time.monotonic() + 60
    while not drawn.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    _interrupt_the_wait(monkeypatch)
    with pytest.raises(RunInterrupted):
        tracker.end("KILLED")
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.metrics == {"train_seconds": 3.0}
    assert [a.path for a in tracker.client.list_artifacts(tracker.run_id)] == ["drawn.png"]
    assert staging is not None and not staging.exists()


def test_ctrl_c_while_the_process_exits_stops_a_busy_helper_without_a_traceback(tmp_path, figures):
    """The command exits while the helper still draws a figure nobody will collect (a run stopped by a second
    Ctrl-C): the exit does not wait for it for long, a Ctrl-C meanwhile prints no traceback, and no helper is
    left drawing."""
    script = _slow_figure_script(tmp_path, 60, """
        if sys.argv[1] == "ctrl-c":
            timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
            timer.daemon = True  # Python's exit waits for the helper, not for this thread
            timer.start()
    """)
    for how in ("exit", "ctrl-c"):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", script, how], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert time.monotonic() - started < 30, how
        assert "Traceback" not in done.stderr, done.stderr
        helper, staging = json.loads(done.stdout)
        assert not _alive(helper), f"{how}: the helper is stopped with the process"
        assert not Path(staging).exists(), f"{how}: the figures nobody collected are removed"


def test_the_helper_draws_the_search_plots_without_importing_torch():
    """The study's plots need Optuna and matplotlib only: the helper that draws them beside the refit does not
    import torch for them (a second torch in memory, seconds of a core the refit trains on)."""
    from types import SimpleNamespace

    import optuna

    from optiflow.search.summary import _log_plots

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=1.0, params={"lr": 0.1}, distributions={
        "lr": optuna.distributions.FloatDistribution(1e-3, 1.0)}))
    recipes: list[Recipe] = []
    queue = SimpleNamespace(log_figure=lambda recipe, artifact: recipes.append(recipe))
    _log_plots(queue, study, SimpleNamespace(metric="val_loss", pruner="median"), complete=1)  # type: ignore[arg-type]
    modules = {recipe.function.partition(":")[0] for recipe in recipes}
    code = f"import importlib, sys\nfor m in {sorted(modules)!r}: importlib.import_module(m)\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "False", (modules, done.stderr)


def test_the_helper_does_not_run_modules_of_the_working_directory(tmp_path, figures):
    """`optiflow` (a console script) never imports a `tempfile.py` of the folder it runs in; its helper, a
    ``python -c``, must not either (Python puts the working directory first on a ``-c`` process's path)."""
    (work := tmp_path / "work").mkdir()
    (work / "tempfile.py").write_text("open('RAN', 'w').write('the working directory ran in the helper')\n"
                                      "raise ImportError('not this one')\n")
    (script := tmp_path / "run.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from optiflow import drawing
        drawer = drawing.Drawer()
        drawer.draw(drawing.Recipe("my_figures:line", {{"values": [1, 2]}}), "line.png")
        drawer._wait()
        print(drawer.queued[0][1].is_file())
        drawer.close()
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=work, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert not (work / "RAN").exists()
    assert done.stdout.strip() == "True", "the helper drew the figure"


def test_a_large_figure_asked_for_behind_a_hung_one_does_not_hang_the_run(tracker, figures, tmp_path, monkeypatch):
    """The helper hangs in one figure; the next asks for more than a pipe holds (a search's plots of thousands
    of trials): asking returns at once, and the run draws both itself once the wait is over."""
    monkeypatch.setattr(drawing, "WAIT_SECONDS", 1.0)
    tracker.prepare_figures()
    tracker.log_figure(Recipe(f"{figures}:slow_beside", {"values": [1, 2], "seconds": 600, "parent": os.getpid()}),
                       "hung.png")
    time.sleep(0.5)  # the helper reads the first request and hangs in it
    started = time.monotonic()
    tracker.log_figure(Recipe(f"{figures}:line", {"values": [1.0] * 200_000}), "large.png")
    assert time.monotonic() - started < 10, "asking for a figure does not wait for the helper"
    tracker.collect_figures()
    assert [a.path for a in tracker.client.list_artifacts(tracker.run_id)] == ["hung.png", "large.png"]
