"""What a run imports and holds in memory (issue 24): the default run imports no scikit-learn, its data
and metrics are exactly those of before, and evaluation batches are sized by memory.

Behaviour only; the time and memory figures come from benchmarks/bench_startup.py and bench_train.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from optiflow import data, loop, sizing
from optiflow.config import RunConfig
from optiflow.data import DataContext
from optiflow.holdout import shuffle_split
from optiflow.plugins import get_registry
from optiflow.sizing import EVALUATION_BATCH, evaluation_batch_size

ROOT = Path(__file__).resolve().parent.parent


def test_digits_are_load_digits_arrays_read_without_scikit_learn(tmp_path):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    digits = get_registry().get("dataset", "digits")
    images = digits.build(DataContext(tmp_path, 0))
    vectors = digits.build(DataContext(tmp_path, 0), image=False)
    expected = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    assert torch.equal(vectors.x, expected) and torch.equal(images.x, expected.reshape(-1, 1, 8, 8))
    assert torch.equal(images.y, torch.tensor(bunch.target, dtype=torch.long))
    assert vectors.feature_names == images.feature_names == list(bunch.feature_names)
    assert images.classes == [str(c) for c in bunch.target_names] and images.raw_scale == 16.0


def heavy_imports_after(work: str, folder: Path) -> str:
    """Which of scikit-learn, Optuna and SciPy's statistics a fresh process has imported after running
    ``work`` (Python source) in ``folder``; raises if the work fails."""
    code = f"import sys\n{work}\nprint(sorted(m for m in ('sklearn', 'optuna', 'scipy.stats') if m in sys.modules))\n"
    env = _with_checkout()  # without an earlier test's MLFLOW_TRACKING_URI: the default store is wanted
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=folder, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_preparing_the_default_run_imports_no_scikit_learn(tmp_path):
    work = ("from optiflow.config import RunConfig\nfrom optiflow.plugins import get_registry\n"
            "from optiflow.run import prepare\nprepare(RunConfig.from_dict({'device': 'cpu'}), get_registry())")
    assert heavy_imports_after(work, tmp_path) == "[]"


def test_preparing_a_cross_validation_fold_imports_no_scikit_learn(tmp_path):
    """A search's folds are cut as scikit-learn's StratifiedKFold cuts them (see the test below), without it."""
    work = ("from optiflow.config import RunConfig\nfrom optiflow.plugins import get_registry\n"
            "from optiflow.run import prepare\n"
            "run = prepare(RunConfig.from_dict({'device': 'cpu', 'cv_folds': 5, 'cv_fold': 3}), get_registry())\n"
            "assert len(run.splits.x_val) in (287, 288), len(run.splits.x_val)")
    assert heavy_imports_after(work, tmp_path) == "[]"


@pytest.mark.slow
def test_the_default_train_command_end_to_end_imports_no_scikit_learn(tmp_path):
    work = ("import importlib.metadata, importlib_metadata\nscans = []\n"
            "for module in (importlib.metadata, importlib_metadata):\n"
            "    module.packages_distributions = lambda *a, **k: scans.append(1) or {}\n"
            "from optiflow.cli import cli\n"  # main() would end the process (host.exit_process) before the check
            "try:\n    cli(['train', '--epochs', '1', '-q'], prog_name='optiflow')\nexcept SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "assert not scans, 'every installed distribution was scanned (MLflow requirement check)'")
    assert heavy_imports_after(work, tmp_path) == "[]"
    import mlflow
    import pandas

    [requirements] = (tmp_path / "mlruns").glob("artifacts/*/models/*/artifacts/requirements.txt")  # model and all
    assert requirements.read_text().split() == [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                                                f"numpy=={np.__version__}", f"pandas=={pandas.__version__}"]


def test_the_logged_requirements_are_checked_without_scanning_every_installed_distribution(monkeypatch, capfd):
    from importlib.metadata import version

    import importlib_metadata
    import mlflow
    from mlflow.utils import environment, requirements_utils

    from optiflow.export import _requirements_checked_directly

    scans = []
    scan = importlib_metadata.packages_distributions
    monkeypatch.setattr(importlib_metadata, "packages_distributions", lambda: scans.append(1) or scan())
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)  # as in a fresh process
    check = environment.warn_dependency_requirement_mismatches
    installed = [f"torch=={version('torch')}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"]
    with _requirements_checked_directly():
        environment.warn_dependency_requirement_mismatches(installed)
        assert scans == [] and "mismatches" not in capfd.readouterr().err
        for differing, said in (("numpy==0.0.1", "numpy (current"), ("torch[extra]==0.0.1", "torch (current"),
                                ("not-installed-anywhere==1.0", "not-installed-anywhere (current: uninstalled"),
                                ("numpy==0.0.1; python_version > '3'", "numpy (current")):
            environment.warn_dependency_requirement_mismatches([*installed, differing])  # MLflow's own check says it
            assert said in capfd.readouterr().err
    assert environment.warn_dependency_requirement_mismatches is check


def _sklearn_split(n, fraction, seed, stratify=None):
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(n), test_size=fraction, random_state=seed, stratify=stratify)


def _labels(kind, n, rng):
    return {
        "none": None,
        "balanced": np.arange(n) % 10,
        "skewed": (rng.random(n) ** 3 * 5).astype(np.int64),
        "one of a class": np.r_[np.zeros(n - 1, dtype=np.int64), [1]],
        "two classes": np.arange(n) % 2,
    }[kind]


def _fold_labels(kind, n, rng):
    """``_labels``, or class labels whose order of first appearance differs from their sorted order (which
    ``StratifiedKFold`` goes by): strings, negative and gapped integers, classes first seen at the end, and
    many classes of one member beside a few large ones."""
    skewed = (rng.random(n) ** 3 * 5).astype(np.int64)
    if kind == "strings":
        return np.array(["zebra", "ant", "moth", "bee", "cat"])[skewed]
    if kind == "negative and gapped":
        return 4 - skewed * 37
    if kind == "classes first seen late":
        return np.r_[np.full(n - n // 3, 9), skewed[: n // 3]]
    if kind == "many of one member":
        return np.r_[skewed[: n - n // 4], -np.arange(1, n // 4 + 1)]
    return _labels(kind, n, rng)


def _as_split_does(split_with, n, fraction, seed, labels):
    """``split_with(n, fraction, seed, labels)``, unstratified when stratifying fails (as ``data.split`` does);
    None when that fails too."""
    try:
        return split_with(n, fraction, seed, labels)
    except ValueError:
        try:
            return split_with(n, fraction, seed, None)
        except ValueError:
            return None


@pytest.mark.parametrize("kind", ["none", "balanced", "skewed", "one of a class", "two classes"])
def test_held_out_splits_are_scikit_learns_train_test_split(kind):
    rng = np.random.default_rng(0)
    compared = 0
    for n in (5, 11, 50, 357, 1797):
        for fraction in (0.1, 0.2, 0.25, 0.5, 0.9):
            for seed in (0, 1, 123, 2**32 - 1):
                labels = _labels(kind, n, rng)
                expected = _as_split_does(_sklearn_split, n, fraction, seed, labels)
                got = _as_split_does(shuffle_split, n, fraction, seed, labels)
                assert (got is None) == (expected is None), (n, fraction, seed)
                if expected is not None:
                    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]), \
                        (n, fraction, seed)
                    assert got[0].dtype == expected[0].dtype
                    compared += 1
    assert compared >= 95


@pytest.mark.parametrize("kind", ["none", "balanced", "skewed", "one of a class", "two classes", "strings",
                                  "negative and gapped", "classes first seen late", "many of one member"])
def test_cross_validation_folds_are_scikit_learns_kfold_and_stratified_kfold(kind):
    """``kfold_split`` cuts a search's folds without importing scikit-learn: the very indices of
    ``(Stratified)KFold(k, shuffle=True, random_state=seed)``, its errors and its warning where it has them."""
    import warnings

    from sklearn.model_selection import KFold, StratifiedKFold

    from optiflow.holdout import kfold_split

    rng = np.random.default_rng(1)
    compared = refused = 0
    for n in (2, 5, 11, 50, 357, 1617):
        for k in sorted({2, 3, 5, 10, n}):
            for seed in (0, 1, 124, 2**32 - 1):
                labels = _fold_labels(kind, n, rng)
                folds = KFold(k, shuffle=True, random_state=seed) if labels is None else \
                    StratifiedKFold(k, shuffle=True, random_state=seed)
                with warnings.catch_warnings(record=True) as theirs:
                    warnings.simplefilter("always")
                    try:
                        expected = list(folds.split(np.zeros((n, 1)), labels))
                    except ValueError as exc:
                        with pytest.raises(ValueError, match=re.escape(str(exc))):
                            kfold_split(n, k, seed, labels)
                        refused += 1
                        continue
                with warnings.catch_warnings(record=True) as ours:
                    warnings.simplefilter("always")
                    got = kfold_split(n, k, seed, labels)
                assert [str(w.message) for w in ours] == [str(w.message) for w in theirs], (n, k, seed)
                assert len(got) == len(expected) == k
                for (train, val), (train_sk, val_sk) in zip(got, expected):
                    assert np.array_equal(train, train_sk) and np.array_equal(val, val_sk), (n, k, seed)
                compared += 1
    assert compared >= 30 and refused > 0  # two samples in three folds or more: refused by both


def test_the_largest_seed_splits_and_folds_like_any_other():
    """--seed 4294967295 is accepted; its salted seeds (test, validation, folds) wrap around instead of
    failing with NumPy's "Seed must be between 0 and 2**32 - 1"."""
    from optiflow.config import MAX_SEED
    from optiflow.plugins import get_registry
    from optiflow.run import prepare

    for extra in ({}, {"cv_folds": 5, "cv_fold": 4}):
        run = prepare(RunConfig.from_dict({"device": "cpu", "data": "iris", "seed": MAX_SEED, **extra}),
                      get_registry())
        assert len(run.splits.x_train) > 0 and len(run.splits.x_val) > 0


def test_a_split_that_leaves_no_training_data_is_refused_as_scikit_learn_refuses_it():
    for n, fraction in ((1, 0.5), (10, 1.0), (10, 0.0)):
        with pytest.raises(ValueError):
            _sklearn_split(n, fraction, 0)
        with pytest.raises(ValueError):
            shuffle_split(n, fraction, 0)


def test_default_run_logs_the_metrics_it_logged_with_scikit_learns_split_and_4096_batches(tmp_path, monkeypatch):
    from optiflow.commands.train import train

    config = RunConfig.from_dict({"epochs": 3, "device": "cpu", "tracking_uri": f"sqlite:///{tmp_path}/m.db",
                                  "experiment": "same"})
    now = train(config, log_model=False, artifacts=False)

    def sklearn_split(n, fraction, seed, stratify=None):
        return _sklearn_split(n, fraction, seed, stratify)

    data._SPLITS.clear()
    monkeypatch.setattr(data, "shuffle_split", sklearn_split)
    monkeypatch.setattr(loop, "evaluation_batch_size", lambda model, x: 4096)
    before = train(config, log_model=False, artifacts=False)
    assert now.metrics == before.metrics and set(now.metrics) >= {"test_accuracy", "test_loss"}
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert now.history[key] == before.history[key], key


def conv_net(channels: int = 32) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(channels), nn.MaxPool2d(2),
                         nn.Flatten(), nn.LazyLinear(10))


def test_evaluation_batches_shrink_as_samples_grow():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    assert evaluation_batch_size(mlp, torch.zeros(360, 64)) == EVALUATION_BATCH  # small models: as before
    sizes = {}
    for side in (28, 56, 112):
        model = conv_net()
        model(torch.zeros(2, 1, side, side))  # materialize the lazy layer
        images = torch.zeros(10, 1, side, side)
        sizes[side] = evaluation_batch_size(model, images)
        activation = 32 * side * side * 4  # bytes of one sample's first conv output
        assert sizes[side] * 2 * activation <= sizing.EVALUATION_BYTES, side  # a layer's input and output fit
    assert EVALUATION_BATCH > sizes[28] > sizes[56] > sizes[112] >= 1
    assert sizes[28] == sizing.EVALUATION_BYTES // (2 * 32 * 28 * 28 * 4)  # sized by the largest layer, ReLU's
    assert evaluation_batch_size(conv_net(), torch.zeros(0, 1, 28, 28)) == EVALUATION_BATCH


def test_sizing_leaves_the_model_as_it_was():
    model = conv_net()
    model(torch.zeros(2, 1, 28, 28))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    evaluation_batch_size(model, torch.randn(8, 1, 28, 28))
    assert model.training and all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN statistics untouched


def test_evaluation_in_memory_sized_batches_gives_the_metrics_of_one_batch(monkeypatch):
    from optiflow.run import prepare

    run = prepare(RunConfig.from_dict({"device": "cpu", "model": "cnn"}), get_registry())
    x, y = run.splits.x_test, run.splits.y_test
    whole = loop.evaluate(run, x, y, "test")
    monkeypatch.setattr(loop, "evaluation_batch_size", lambda model, x: 7)
    batched = loop.evaluate(run, x, y, "test")
    assert batched["test_accuracy"] == whole["test_accuracy"]
    assert batched["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-5)


@pytest.fixture
def weighed_images():
    """A registered dataset of 400 8x8 images (with its own test set) that remembers its tensors weakly."""
    import weakref

    from optiflow.data import DataSource

    made: dict[str, weakref.ref] = {}

    def weighed(ctx):
        """400 random 1x8x8 images in 4 classes."""
        generator = torch.Generator().manual_seed(0)
        x, x_test = torch.rand(400, 1, 8, 8, generator=generator), torch.rand(40, 1, 8, 8, generator=generator)
        made.update(x=weakref.ref(x), x_test=weakref.ref(x_test))
        return DataSource(x, torch.arange(400) % 4, "classification", x_test=x_test, y_test=torch.arange(40) % 4)

    registry = get_registry()
    registry.registrar("data", "test-weighed")("weighed", weighed)
    yield made
    registry.remove_plugin("test-weighed")


def test_a_run_keeps_one_copy_of_its_data(weighed_images):
    from optiflow.run import EXAMPLE_SAMPLES, prepare

    run = prepare(RunConfig.from_dict({"data": "weighed", "device": "cpu"}), get_registry())
    assert weighed_images["x"]() is None and weighed_images["x_test"]() is None  # the raw tensors are gone
    assert run.source.x.shape == (EXAMPLE_SAMPLES, 1, 8, 8) and run.source.x_test.shape == (EXAMPLE_SAMPLES, 1, 8, 8)
    assert run.source.input_shape == (1, 8, 8) and len(run.source.y) == 400 and run.source.num_classes == 4
    assert run.splits.sizes() == {"train": 360, "val": 40, "test": 40}
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(run.source.x, torch.rand(400, 1, 8, 8, generator=generator)[:EXAMPLE_SAMPLES])


def test_a_source_shared_by_a_search_stays_whole(weighed_images):
    from optiflow.run import prepare, shared_data

    with shared_data():
        first = prepare(RunConfig.from_dict({"data": "weighed", "device": "cpu", "cv_folds": 2}), get_registry())
        second = prepare(RunConfig.from_dict({"data": "weighed", "device": "cpu", "cv_folds": 2, "cv_fold": 1}),
                         get_registry())
        assert first.source is second.source and len(first.source.x) == 400
        assert weighed_images["x"]() is first.source.x


def test_the_logged_model_takes_the_first_raw_samples_as_its_example(weighed_images):
    from optiflow.export import inference_module
    from optiflow.run import prepare

    run = prepare(RunConfig.from_dict({"data": "weighed", "device": "cpu"}), get_registry())
    _, card, example = inference_module(run)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(example, torch.rand(400, 1, 8, 8, generator=generator)[:5]) and card.input_shape == [1, 8, 8]


def test_a_non_finite_value_is_found_in_any_chunk_of_a_large_set(monkeypatch):
    from optiflow.data import DataSource
    from optiflow.errors import OptiflowError

    monkeypatch.setattr(sizing, "FINITE_CHECK_VALUES", 64)  # 2 samples of 32 values a check
    x = torch.zeros(50, 4, 8)
    x[37, 1, 5] = float("nan")
    with pytest.raises(OptiflowError, match="the training data holds nan in sample 37;"):
        DataSource(x, torch.arange(50) % 2, "classification")
    x[37, 1, 5], x[49, 3, 7] = 0.0, float("inf")
    with pytest.raises(OptiflowError, match="holds inf in sample 49"):
        DataSource(x, torch.arange(50) % 2, "classification")


def test_scaling_never_changes_the_tensor_a_dataset_gave():
    from optiflow.data import DataSource

    given = torch.full((4, 3), 16.0)
    source = DataSource(given, torch.arange(4) % 2, "classification", raw_scale=16.0)
    assert torch.equal(given, torch.full((4, 3), 16.0)) and torch.equal(source.x, torch.ones(4, 3))
    images = torch.full((4, 1, 2, 2), 255, dtype=torch.uint8)
    assert torch.equal(DataSource(images, torch.arange(4) % 2, "classification").x, torch.ones(4, 1, 2, 2))
    assert int(images.max()) == 255


def _exit_after(work: str, folder: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run ``work`` (Python source: it sets ``out``, the folder) and then optiflow's ``main()`` in a fresh process."""
    code = f"import pathlib, sys\nout = pathlib.Path({str(folder)!r})\n{work}\nfrom optiflow.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=folder,
                          env=_with_checkout(), timeout=timeout)


def _python(code: str, timeout: int) -> subprocess.CompletedProcess[str]:
    """Run Python source ``code`` in a fresh process with this checkout first on the path."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_with_checkout(),
                          timeout=timeout)


def _with_checkout() -> dict[str, str]:
    """This environment with this checkout first on ``PYTHONPATH``, without a ``MLFLOW_TRACKING_URI`` an earlier
    in-process test left (MLflow exports the URI a model was logged to): the command uses its folder's store."""
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**inherited, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("argv, exit_code", [(["--version"], 0), (["train", "--epochs", "0"], 2)])
def test_a_command_ends_after_its_threads_and_exit_handlers_with_its_exit_code(tmp_path, argv, exit_code):
    """optiflow skips the interpreter's teardown (``host.exit_process``) but not what Python's exit promises: a
    non-daemon thread still running is waited for, ``atexit`` and ``weakref.finalize`` handlers run, the
    exit code and the one error line stay."""
    work = (
        "import atexit, threading, time, weakref\n"
        "atexit.register(lambda: (out / 'atexit').write_text('ran'))\n"
        "class Held: pass\n"
        "held = Held()\n"
        "weakref.finalize(held, (out / 'finalized').write_text, 'ran')\n"
        "threading.Thread(target=lambda: (time.sleep(1.5), (out / 'thread').write_text('done'))).start()\n"
        f"sys.argv = ['optiflow', *{argv!r}]\n")
    done = _exit_after(work, tmp_path)
    assert done.returncode == exit_code, done.stderr
    assert "Traceback" not in done.stderr
    if exit_code:
        assert len(done.stderr.strip().splitlines()) == 1 and "epochs" in done.stderr
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "finalized").read_text() == "ran"


def test_the_interpreter_teardown_is_skipped_and_text_exit_codes_are_said(tmp_path):
    """What makes the exit fast: objects are not torn down one by one (a ``__del__`` left for the teardown does
    not run; it is no promise of Python's, and docs/plugins.md says to use ``atexit``); a text exit code is
    printed on stderr and exits 1, as Python's own exit does."""
    code = ("import pathlib, sys\nfrom optiflow.host import exit_process\n"
            f"out = pathlib.Path({str(tmp_path)!r})\n"
            "class Torn:\n    def __del__(self): (out / 'torn').write_text('ran')\n"
            "kept = Torn()\nprint('written', flush=False)\nexit_process('bye: a text code')\n")
    env = _with_checkout()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (1, "written\n", "bye: a text code\n")
    assert not (tmp_path / "torn").exists()


def test_an_idle_thread_pool_does_not_hold_the_exit(tmp_path):
    """A ``ThreadPoolExecutor`` still referenced at exit with an idle worker (MLflow's local artifact repository
    keeps one after `optiflow predict RUN` downloads the model) is told to stop, as Python's exit tells it, and
    the command ends with its exit code; joining the non-daemon threads alone waited on that worker forever."""
    work = ("import concurrent.futures\n"
            "pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)\n"
            "pool.submit((out / 'task').write_text, 'done').result()\n"
            "sys.argv = ['optiflow', 'train', '--epochs', '0']\n")
    done = _exit_after(work, tmp_path, timeout=60)
    assert done.returncode == 2 and "epochs" in done.stderr, done.stderr
    assert (tmp_path / "task").read_text() == "done"


def test_ctrl_c_while_the_exit_waits_for_a_thread_is_one_line_and_130(tmp_path):
    """Ctrl-C while the exit waits for a plugin's non-daemon thread: one line and 130, no traceback (Python's own
    exit printed a traceback and exited 0), and the ``atexit`` handlers still run."""
    import signal
    import time

    code = (f"import atexit, pathlib, signal, sys, threading, time\nout = pathlib.Path({str(tmp_path)!r})\n"
            # Ctrl-C as from a terminal, though pytest may run as a background job (which ignores SIGINT)
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "atexit.register(lambda: (out / 'atexit').write_text('ran'))\n"
            "threading.Thread(target=time.sleep, args=(60,)).start()\n"
            "sys.argv = ['optiflow', '--version']\n"
            "from optiflow.cli import main\nmain()\n")
    env = _with_checkout()
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    assert process.stdout is not None
    printed = process.stdout.readline()  # --version has printed (click flushes): the exit is about to wait
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert (process.returncode, printed + stdout) == (130, f"optiflow {_version()}\n"), stderr
    assert stderr == "Error: interrupted while waiting for the command's threads to finish\n"
    assert (tmp_path / "atexit").read_text() == "ran"


def _version() -> str:
    from importlib.metadata import version

    return version("optiflow")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_lost_at_exit_on_a_full_disk_is_one_error_line_and_exit_1(tmp_path):
    """`optiflow list optimizer > file` on a full disk: the table still buffered when the command ends cannot be
    written; the exit says so in one line and exits 1 (Python's own exit said it in two lines and exited 120), never
    0 as if the file held the table.  A reader that left (`| head`) is no failure."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "optiflow", "list", "optimizer"], stdout=full,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("Error: no space left on the device"), \
        done.stderr


def test_the_store_file_alone_holds_the_run_when_the_command_has_ended(tmp_path):
    """After `optiflow train` the run is in ``mlflow.db`` itself, not only in its ``-wal`` file: a copy of the
    database file alone (a backup, a scp) holds it, as when the teardown closed MLflow's connections."""
    import shutil
    import sqlite3

    env = _with_checkout()
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store, mlruns/mlflow.db, is the one looked at
    done = subprocess.run([sys.executable, "-m", "optiflow", "train", "--epochs", "1", "-q"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    copy = shutil.copy(tmp_path / "mlruns" / "mlflow.db", tmp_path / "copy.db")
    with contextlib.closing(sqlite3.connect(copy)) as db:
        assert db.execute("SELECT status FROM runs").fetchall() == [("FINISHED",)]


@pytest.mark.parametrize("module", ["optiflow", "optiflow.cli"])
def test_both_module_entry_points_run_the_command(tmp_path, module):
    env = _with_checkout()
    done = subprocess.run([sys.executable, "-m", module, "train", "--epochs", "0"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("Error:") and "epochs" in done.stderr


def test_objects_imports_make_are_frozen_and_later_garbage_is_still_collected(tmp_path):
    """``host.scan_imported_objects_once`` (the ``optiflow`` command's): a full collection after an import wave
    freezes its survivors, so later collections skip them; a full collection with no import in between freezes
    nothing, and a reference cycle made after the imports is still reclaimed, as is a cycle made during them that
    was garbage at the collection."""
    code = (
        "import gc, sys, weakref\nfrom optiflow.host import scan_imported_objects_once\n"
        "scan_imported_objects_once(); scan_imported_objects_once()\n"
        "class Node: pass\n"
        "def cycle():\n    node = Node(); node.me = node; return weakref.ref(node)\n"
        "early = cycle()\n"
        "import asyncio, email.parser, http.client, xml.dom.minidom, unittest, argparse\n"
        "gc.collect()\nwave = gc.get_freeze_count()\n"
        "later = cycle()\ngc.collect()\n"
        "print(len(gc.callbacks), wave > 10000, gc.get_freeze_count() == wave, early() is None, later() is None)\n")
    env = _with_checkout()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.split() == ["1", "True", "True", "True", "True"], done.stderr


def test_the_optiflow_command_freezes_what_its_imports_made(tmp_path):
    """``main()`` installs the freezer for the whole command (an exit handler imports a wave of modules and
    collects: what the wave made is frozen); the same code run without the command freezes nothing."""
    wave = ("import asyncio, email.parser, http.client, xml.dom.minidom, unittest, argparse, gc\n"
            "gc.collect()\n(out / 'frozen').write_text(str(gc.get_freeze_count()))\n")
    work = ("import atexit\ndef wave():\n" + "".join(f"    {line}\n" for line in wave.splitlines())
            + "atexit.register(wave)\nsys.argv = ['optiflow', '--version']\n")
    done = _exit_after(work, tmp_path)
    assert done.returncode == 0, done.stderr
    assert int((tmp_path / "frozen").read_text()) > 10000
    plain = subprocess.run([sys.executable, "-c", f"import pathlib\nout = pathlib.Path({str(tmp_path)!r})\n{wave}"],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and (tmp_path / "frozen").read_text() == "0", plain.stderr


def test_the_command_s_collector_waits_for_its_imports_and_freezes_them_unscanned():
    """``scan_imported_objects_once`` pauses the collector (its youngest threshold raised) until a training
    command has imported what its runs need (``imports_done``, which imports the modules ``ahead``): a wave of
    imports meanwhile runs no collection, and is frozen unscanned as the pause ends, thresholds restored.
    ``imports_ahead`` (a run's end) pauses again, then resumes without a freeze (the run's state is alive), as
    ``imports_done(freeze=False)`` does (a training starts).  Outside the command both are no-ops."""
    code = (
        "import gc, sys\nfrom optiflow import host\n"
        "normal = gc.get_threshold()\n"
        "host.imports_done(ahead=['xml.dom.minidom'])\nwith host.imports_ahead():\n    pass\n"
        "library = gc.get_threshold() == normal and gc.get_freeze_count() == 0 and 'xml.dom.minidom' not in sys.modules\n"
        "host.scan_imported_objects_once()\n"
        "paused = gc.get_threshold() == (host.PAUSED_THRESHOLD, *normal[1:])\n"
        "seen = []\ngc.callbacks.insert(0, lambda phase, info: seen.append(info) if phase == 'start' else None)\n"
        "import asyncio, email.parser, http.client, unittest, argparse\n"
        "host.imports_done(ahead=['xml.dom.minidom', 'no_such_module_here'])\n"
        "ahead = 'xml.dom.minidom' in sys.modules\nduring = len(seen)\n"
        "first = gc.get_freeze_count()\nrestored = gc.get_threshold() == normal\n"
        "with host.imports_ahead():\n"
        "    again = gc.get_threshold()[0] == host.PAUSED_THRESHOLD\n"
        "    import xmlrpc.client, http.server, doctest, pydoc, mailbox, smtplib, imaplib\n"
        "host.scan_imported_objects_once()\nhost.imports_done(freeze=False)\n"
        "print(library, paused, ahead, during, first > 10000, restored, again, gc.get_freeze_count() == first,\n"
        "      gc.get_threshold() == normal)\n")
    done = _python(code, timeout=60)
    assert done.stdout.split() == ["True", "True", "True", "0", "True", "True", "True", "True", "True"], done.stderr


def test_a_command_that_never_trains_still_collects_once_a_million_objects_are_alive():
    """The pause is a raised threshold, not a disabled collector: a command that never reaches a training (a
    long ``predict``) collects once :data:`~optiflow.host.PAUSED_THRESHOLD` more objects are alive, then as usual
    (nothing frozen by that collection: it followed no full one), and reclaims the cycles made meanwhile."""
    code = (
        "import gc, weakref\nfrom optiflow import host\n"
        "normal = gc.get_threshold()\nhost.scan_imported_objects_once()\n"
        "class Node: pass\nnode = Node(); node.me = node; early = weakref.ref(node); del node\n"
        "kept = [[] for _ in range(host.PAUSED_THRESHOLD + 100_000)]\n"
        "print(gc.get_threshold() == normal, gc.get_freeze_count() == 0)\n"
        "gc.collect(0); gc.collect(1)\nprint(early() is None)\n")
    done = _python(code, timeout=120)
    assert done.stdout.split() == ["True", "True", "True"], done.stderr



@pytest.mark.parametrize("before", ["700 10 10", "0 10 10", "2000000 10 10"], ids=["default", "off", "higher"])
def test_thresholds_a_user_or_plugin_sets_are_kept_by_the_pause(before):
    """The pause only raises the youngest threshold (a collector a user turned off with threshold 0, or set
    higher than the pause's, stays as set) and, as it ends, restores the thresholds only where nobody changed
    them meanwhile: a plugin that sets its own at import (the command waits then), in ``optiflow_run_end``
    (inside ``imports_ahead``), or before a collection that ends a pause keeps them."""
    code = (
        "import gc, sys\nfrom optiflow import host\n"
        f"gc.set_threshold({before.replace(' ', ', ')})\nhost.scan_imported_objects_once()\n"
        "raised = gc.get_threshold()[0]\n"
        "gc.set_threshold(5000, 20, 30)\nhost.imports_done()\nfirst = gc.get_threshold()\n"
        "with host.imports_ahead():\n    gc.set_threshold(9000, 5, 5)\nsecond = gc.get_threshold()\n"
        "with host.imports_ahead():\n    gc.set_threshold(4000, 5, 5)\n    gc.collect()\nthird = gc.get_threshold()\n"
        "with host.imports_ahead():\n    pass\n"
        "print(raised, *first, *second, *third, *gc.get_threshold())\n")
    done = _python(code, timeout=60)
    expected_raised = {"700 10 10": "1000000"}.get(before, before.split()[0])
    assert done.stdout.split() == [expected_raised, "5000", "20", "30", "9000", "5", "5", "4000", "5", "5",
                                   "4000", "5", "5"], done.stderr


COLLECTOR_WATCH = """
import atexit, gc
from optiflow import hookimpl
from optiflow.plugins import registered_plugin
normal, seen = gc.get_threshold()[0], {}
class Watch:
    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        seen.setdefault('epoch', (gc.get_threshold()[0] == normal, gc.get_freeze_count() > 10000))
    @hookimpl
    def optiflow_run_end(self, run, status):
        seen['end'] = gc.get_threshold()[0] > normal
atexit.register(lambda: (out / 'seen').write_text(' '.join(map(str, [*seen['epoch'], seen['end'],
                                                                      gc.get_threshold()[0] == normal]))))
registration = registered_plugin(Watch(), name='watch')  # kept: main() never returns
registration.__enter__()
sys.argv = ['optiflow', 'train', '--epochs', '2', '--model', 'mlp:hidden=[16]', '--no-reuse', '-q']
"""


def test_optiflow_train_trains_with_the_collector_as_usual_and_its_imports_frozen(tmp_path):
    """In ``optiflow train``, the epochs run with the collector's usual thresholds and the setup's imports
    already frozen; the run's end (figures, the model's export) is paused again; the command ends with the
    usual thresholds."""
    done = _exit_after(COLLECTOR_WATCH, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "seen").read_text() == "True True True True"



def test_optiflow_reproduce_trains_with_its_imports_frozen_as_train_does(tmp_path):
    """``reproduce`` is a training command too: its run trains with the usual thresholds and what the imports
    made already frozen (``imports_done`` ahead of the run), as ``train``'s does."""
    first = _exit_after(COLLECTOR_WATCH, tmp_path)
    assert first.returncode == 0, first.stderr
    from optiflow.tracking import client

    store = client(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run_id = store.search_runs([store.get_experiment_by_name("optiflow").experiment_id])[0].info.run_id
    argv = "sys.argv = ['optiflow', 'train', '--epochs', '2', '--model', 'mlp:hidden=[16]', '--no-reuse', '-q']"
    again = _exit_after(COLLECTOR_WATCH.replace(argv, f"sys.argv = ['optiflow', 'reproduce', {run_id!r}, '-q']"),
                        tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "seen").read_text() == "True True True True"


def test_optiflow_predict_reads_its_input_with_the_collector_as_usual(tmp_path):
    """``predict`` ends the collector's pause before it reads its input (``imports_done``): what it imported is
    frozen, and the rows it reads are collected at the usual thresholds, not after a million objects."""
    first = _exit_after(COLLECTOR_WATCH, tmp_path)
    assert first.returncode == 0, first.stderr
    from optiflow.tracking import client

    store = client(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run_id = store.search_runs([store.get_experiment_by_name("optiflow").experiment_id])[0].info.run_id
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(f"pixel_{i // 8}_{i % 8}" for i in range(64)) + "\n" + "\n".join(",".join(["3"] * 64) for _ in range(5)))
    work = ("import atexit, gc\nnormal = gc.get_threshold()\n"
            "atexit.register(lambda: (out / 'seen').write_text(f'{gc.get_threshold() == normal} '\n"
            "                                                   f'{gc.get_freeze_count() > 10000}'))\n"
            f"sys.argv = ['optiflow', 'predict', {run_id!r}, '--input', {str(rows)!r}, '-q']\n")
    done = _exit_after(work, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "seen").read_text() == "True True"


@pytest.mark.parametrize("argv", [["search", "--space", "lr=loguniform:0.1:0.01"], ["compare", "--vary", "opt=nope"]],
                         ids=["search", "compare"])
def test_search_and_compare_refuse_bad_input_before_importing_ahead(tmp_path, argv):
    """The training commands import what their runs need ahead (``imports_done``) once their input is checked: a
    bad ``--space`` or ``--vary`` is one line without waiting for ``torch._dynamo`` and MLflow's store."""
    work = ("import atexit\n"
            "atexit.register(lambda: (out / 'seen').write_text(str('torch._dynamo' in sys.modules)))\n"
            f"sys.argv = ['optiflow', *{argv!r}]\n")
    done = _exit_after(work, tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("Error:") and len(done.stderr.splitlines()) == 1, done.stderr
    assert (tmp_path / "seen").read_text() == "False"


MID_RUN_WAVE = """
import atexit, gc, weakref
from optiflow import hookimpl
from optiflow.plugins import registered_plugin
held = {}
class MidRunImports:
    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        if epoch == 1:
            held.update(run=weakref.ref(run), model=weakref.ref(run.model), optimizer=weakref.ref(run.optimizer))
            if CYCLE:
                run.__dict__['plugin_state'] = {'run': run}
            frozen = gc.get_freeze_count()
            import xml.dom.minidom, xmlrpc.client, http.server, unittest, doctest, pydoc, mailbox, smtplib, imaplib
            gc.collect()
            held['froze'] = gc.get_freeze_count() > frozen + 10000
def kept():
    gc.collect()
    alive = sorted(name for name in ('run', 'model', 'optimizer') if held[name]() is not None)
    (out / 'kept').write_text(' '.join([str(held['froze']), *alive]))
atexit.register(kept)
registration = registered_plugin(MidRunImports(), name='mid-run-imports')  # kept: main() never returns
registration.__enter__()
sys.argv = ['optiflow', 'train', '--epochs', '2', '--model', 'mlp:hidden=[16]', '--no-reuse', '-q']
"""


@pytest.mark.parametrize("cycle, kept", [(False, "True"), (True, "True model optimizer run")])
def test_a_run_alive_at_a_mid_run_import_wave_is_freed_when_it_ends_unless_it_is_a_cycle(tmp_path, cycle, kept):
    """docs/plugins.md's promise: a freeze takes the run in progress when a plugin imports a library mid-run
    (epoch 1 here), and optiflow's own run state (the ``Run``, its model and optimizer) has no reference cycle, so
    reference counting still frees it when the run ends.  A plugin that ties the ``Run`` into a cycle keeps the
    whole run until the command ends, as the docs warn."""
    done = _exit_after(f"CYCLE = {cycle}\n{MID_RUN_WAVE}", tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "kept").read_text() == kept
