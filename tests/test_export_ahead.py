"""The model traced while the run trains (optiflow/export_ahead.py): a fork of the run's process exports it and
writes the program with the trained weights, the very program the run would have exported itself (the same bytes);
whatever goes wrong with the fork (it fails, hangs, is stale because the model changed, the run is killed) leaves
the run exporting itself as it always did, and no process or folder behind."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from optiflow import export_ahead, hookimpl
from optiflow.config import RunConfig
from optiflow.drawing import _Helper
from optiflow.export_ahead import fingerprint
from optiflow.training import train

from helpers import tracked_status

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def exports(monkeypatch):
    """The pids of the processes that called ``torch.export.export`` (the run's own, or the fork's: not seen here)."""
    calls: list[int] = []
    real = torch.export.export

    def counted(*args, **kwargs):
        calls.append(os.getpid())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counted)
    return calls


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Temporary folders (the fork's) made under ``tmp_path/tmp``: the test sees what is left."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def program_bytes(tracking_uri: str, run_id: str, folder: Path) -> bytes:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model/data/model.pt2", dst_path=str(folder))
    return Path(local).read_bytes()


def trained(tracking_uri: str, experiment: str, **settings) -> str:
    config = RunConfig.from_dict({"epochs": 3, "device": "cpu", "tracking_uri": tracking_uri,
                                  "experiment": experiment, **settings})
    result = train(config)
    assert tracked_status(result) == "FINISHED"
    return result.run_id


def forks_of(pid: int) -> list[int]:
    """The children of ``pid`` that are forks of it (the same command line; the drawing helper is not)."""
    def cmdline(p: int) -> bytes:
        try:
            return Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            return b""

    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with_children = (task / "children").read_text().split() if (task / "children").exists() else []
        children += [int(c) for c in with_children]
    return [c for c in children if cmdline(c) == cmdline(pid)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("settings", [{}, {"model": "mlp:hidden=(32,16),batch_norm=before,dropout=0.2"},
                                      {"data": "diabetes"}], ids=["default", "batch-norm-dropout", "regression"])
def test_the_program_traced_beside_the_run_is_the_one_the_run_would_export(
        settings, tracking_uri, experiment, exports, scratch, tmp_path, monkeypatch):
    ahead = trained(tracking_uri, experiment, **settings)
    assert exports.count(os.getpid()) == 0, "the run's process exported nothing: the fork's program was logged"
    monkeypatch.setenv("OPTIFLOW_EXPORT_AHEAD", "0")
    itself = trained(tracking_uri, experiment, **settings)
    assert exports.count(os.getpid()) == 1
    assert program_bytes(tracking_uri, ahead, tmp_path / "a") == program_bytes(tracking_uri, itself, tmp_path / "b")
    assert left_in(scratch) == [] and forks_of(os.getpid()) == []


class Doubler:
    """A plugin changing the model after the fork traced it: its logits doubled by a forward hook at run end."""

    @hookimpl
    def optiflow_run_end(self, run, status):
        run.model.register_forward_hook(lambda module, inputs, output: output * 2)


def test_a_model_changed_while_it_trained_is_exported_by_the_run_as_it_ended(
        plugin, tracking_uri, experiment, exports, scratch, tmp_path, monkeypatch):
    from optiflow import export

    plugin(Doubler(), "doubler")
    ahead = trained(tracking_uri, experiment, data="diabetes")
    assert exports.count(os.getpid()) == 1, "the fork's trace was stale: the run exported itself"
    program = export.load_module(f"runs:/{ahead}/model")
    doubled = program(torch.ones(2, 10))
    monkeypatch.setenv("OPTIFLOW_EXPORT_AHEAD", "0")
    itself = trained(tracking_uri, experiment, data="diabetes")
    assert program_bytes(tracking_uri, ahead, tmp_path / "a") == program_bytes(tracking_uri, itself, tmp_path / "b")
    assert torch.equal(doubled, export.load_module(f"runs:/{itself}/model")(torch.ones(2, 10)))
    assert list(scratch.glob("optiflow-export-*")) == []


def test_what_the_fork_printed_while_it_traced_is_printed_by_the_run(
        tracking_uri, experiment, exports, scratch, monkeypatch, capsys):
    real = torch.export.export

    def noisy(*args, **kwargs):
        print("tracing says hello", file=sys.stderr)
        print("tracing says hello on stdout")  # a model's forward printing, say
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", noisy)
    trained(tracking_uri, experiment)
    printed = capsys.readouterr()
    assert printed.err.count("tracing says hello") == 1
    assert printed.out.count("tracing says hello on stdout") == 1


def hang(*_):
    time.sleep(120)  # no CPU: the run gives up on it
    return 1


def fail(*_):
    raise RuntimeError("the fork broke")


def spin(*_):
    while True:  # it works, and never ends: the run waits WAIT_SECONDS at most
        pass


@pytest.mark.parametrize("trace", [fail, hang, spin], ids=["fails", "hangs", "spins"])
def test_a_fork_that_fails_or_hangs_leaves_the_run_exporting_itself(
        trace, tracking_uri, experiment, exports, scratch, monkeypatch):
    monkeypatch.setattr(export_ahead, "_trace", trace)
    monkeypatch.setattr(export_ahead, "STUCK_SECONDS", 0.5)
    monkeypatch.setattr(export_ahead, "WAIT_SECONDS", 1.0)
    trained(tracking_uri, experiment)
    assert exports.count(os.getpid()) == 1
    assert forks_of(os.getpid()) == [] and list(scratch.glob("optiflow-export-*")) == []


def test_a_run_with_more_data_than_is_small_is_not_traced_beside_it(
        tracking_uri, experiment, exports, scratch, monkeypatch):
    monkeypatch.setattr(export_ahead, "SMALL_DATA_BYTES", 1000)
    trained(tracking_uri, experiment)
    assert exports.count(os.getpid()) == 1 and list(scratch.glob("optiflow-export-*")) == []


def test_a_run_with_a_big_model_is_not_traced_beside_it(tracking_uri, experiment, exports, scratch, monkeypatch):
    """The fork holds the model several times (its copy to trace, the weights sent, the pages training rewrites:
    800 MB for a 144 MB MLP): the model counts towards what is small, as the data does."""
    from optiflow.plugins import get_registry
    from optiflow.run import prepare

    settings = {"epochs": 3, "device": "cpu", "model": "mlp:hidden=(512,)"}
    data = sum(t.element_size() * t.numel() for t in prepare(RunConfig.from_dict(settings), get_registry()).splits.tensors())
    monkeypatch.setattr(export_ahead, "SMALL_DATA_BYTES", data + 100_000)  # the model's 140 kB weights are more
    trained(tracking_uri, experiment, model="mlp:hidden=(512,)")
    assert exports.count(os.getpid()) == 1 and list(scratch.glob("optiflow-export-*")) == []
    monkeypatch.setattr(export_ahead, "SMALL_DATA_BYTES", data + 200_000)
    trained(tracking_uri, experiment, model="mlp:hidden=(512,)")
    assert exports.count(os.getpid()) == 1, "a model of 140 kB is small"


def test_the_fingerprint_sees_what_a_trace_reads_but_the_weights():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)
            self.scale = 1.0
            self.register_buffer("offset", torch.zeros(2), persistent=False)
            self.register_buffer("count", torch.zeros(1))

        def forward(self, x):
            return self.linear(x) * self.scale + self.offset

    model = Scaled()
    first = fingerprint(model)
    with torch.no_grad():
        model.linear.weight.add_(1.0)
        model.count.add_(1)  # a persistent buffer travels with the weights
    assert fingerprint(model) == first
    changes = [lambda m: setattr(m, "scale", 2.0), lambda m: m.offset.add_(1.0),
               lambda m: m.register_forward_hook(lambda *a: None), lambda m: m.linear.register_forward_pre_hook(print),
               lambda m: setattr(m, "linear", nn.Linear(3, 2, bias=False)), lambda m: m.train(not m.training),
               lambda m: setattr(m, "forward", lambda x: x), lambda m: m.linear.weight.requires_grad_(False)]
    for change in changes:
        changed = Scaled()
        changed.load_state_dict(model.state_dict())
        assert fingerprint(changed) == first
        with torch.no_grad():
            change(changed)
        assert fingerprint(changed) != first


def terminal_signals() -> None:
    """In the child: SIGHUP as a terminal's process has it (a test run under nohup ignores it, and so would its
    children)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def cli(*args: str, tmp: Path, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "optiflow", "train", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=terminal_signals)


def wait_for(condition, seconds: float = 120.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def left_in(tmp: Path) -> list[str]:
    """What is in the temporary folder but torch's compile cache (made by a run exporting itself too)."""
    return sorted(p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor"))


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGHUP],
                         ids=["ctrl-c", "sigterm", "sigkill", "terminal-closed"])
def test_a_run_stopped_while_its_model_is_traced_leaves_no_fork_and_no_folder(how, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    process = cli("--epochs", "3000", "-q", tmp=tmp, cwd=tmp_path)
    try:
        [fork] = wait_for(lambda: forks_of(process.pid))
        wait_for(lambda: any(tmp.glob("optiflow-export-*/export.log")))  # it traced, and waits for the weights
        time.sleep(1.0)
        if how == signal.SIGHUP:  # the terminal closed: its session's processes, the fork too, get SIGHUP
            os.killpg(process.pid, how)
        else:
            process.send_signal(how)
        code = process.wait(60)
        assert code == {signal.SIGINT: 130, signal.SIGTERM: 143}.get(how, -how), process.stderr.read()
        wait_for(lambda: not alive(fork), 10)
        wait_for(lambda: left_in(tmp) == [], 10)
    finally:
        process.kill()
        process.wait()


def test_a_drawing_helper_never_asked_to_draw_is_stopped_at_exit_without_waiting():
    helper = _Helper()
    helper.start()
    assert helper.process is not None
    helper.close(helper.process)
    assert helper.process.returncode == -signal.SIGKILL


class Calibration:
    """A plugin whose hook, registered at run start, reads state it changes at run end (a temperature it fits):
    ``how`` is where that state lives, none of it a tensor or a number on a module."""

    def __init__(self, how: str) -> None:
        self.how, self.temperature, self.cell = how, 1.0, [1.0]

    def scaled(self, module, inputs, output):
        return output / self.temperature

    @hookimpl
    def optiflow_run_start(self, run):
        import types

        self.temperature, self.cell[0] = 1.0, 1.0  # each run starts from the same state
        cell = self.cell
        hooks = {"bound-method": self.scaled, "closure": lambda m, i, o: o / cell[0],
                 "object-attribute": lambda m, i, o: o / m.calibration.t, "builtin": lambda m, i, o: m.squash(o)}
        run.model.calibration, run.model.squash = types.SimpleNamespace(t=1.0), torch.tanh
        run.model.register_forward_hook(hooks[self.how])

    @hookimpl
    def optiflow_run_end(self, run, status):
        self.temperature, self.cell[0], run.model.calibration.t, run.model.squash = 2.0, 2.0, 2.0, torch.sigmoid


class Tempered(nn.Sequential):
    """A model class whose forward reads a class attribute and calls a method, both changed at run end."""

    temperature = 1.0

    def forward(self, x):
        return self.tempered(super().forward(x))

    def tempered(self, y):
        return y / self.temperature


class ClassCalibration:
    def __init__(self, how: str) -> None:
        self.how = how

    @hookimpl
    def optiflow_run_start(self, run):
        Tempered.temperature, Tempered.tempered = 1.0, ClassCalibration.divided  # each run starts the same
        run.model.__class__ = Tempered

    @staticmethod
    def divided(self, y):
        return y / self.temperature

    @hookimpl
    def optiflow_run_end(self, run, status):
        if self.how == "class-attribute":
            Tempered.temperature = 2.0
        else:
            Tempered.tempered = lambda self, y: y / 2.0


@pytest.mark.parametrize("how", ["bound-method", "closure", "object-attribute", "builtin", "class-attribute",
                                 "class-method"])
def test_a_hook_whose_state_changed_while_the_run_trained_is_exported_as_it_ended(
        how, plugin, tracking_uri, experiment, scratch, tmp_path, monkeypatch):
    from optiflow import export

    plugin(ClassCalibration(how) if how.startswith("class") else Calibration(how), "calibration")
    ahead = trained(tracking_uri, experiment, data="diabetes")
    monkeypatch.setenv("OPTIFLOW_EXPORT_AHEAD", "0")
    itself = trained(tracking_uri, experiment, data="diabetes")
    rows = torch.ones(2, 10)
    assert torch.equal(export.load_module(f"runs:/{ahead}/model")(rows),
                       export.load_module(f"runs:/{itself}/model")(rows)), "the logged model is the one traced"
    assert program_bytes(tracking_uri, ahead, tmp_path / "a") == program_bytes(tracking_uri, itself, tmp_path / "b")


GAIN = 1.0  #: read by Gained.forward as a global


OFFSET = 0.0  #: read by offset(), which Gained.forward calls


def offset(x, times=1):
    return x + OFFSET if times <= 1 else offset(x, times - 1)  # recursive: it names itself as a global


class Gained(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.tied = nn.Linear(3, 3), nn.Linear(3, 3)
        self.options = {"act": functools.partial(torch.nn.functional.leaky_relu, negative_slope=0.1)}

    def forward(self, x):
        return offset(self.options["act"](self.tied(self.linear(x))) * GAIN)


def test_the_fingerprint_sees_globals_partials_tied_or_strided_weights_and_has_none_for_what_it_cannot_describe(
        monkeypatch):
    import sqlite3

    first = fingerprint(Gained())
    assert first is not None and fingerprint(Gained()) == first
    monkeypatch.setattr(sys.modules[__name__], "GAIN", 2.0)
    assert fingerprint(Gained()) != first
    monkeypatch.setattr(sys.modules[__name__], "GAIN", 1.0)
    monkeypatch.setattr(sys.modules[__name__], "OFFSET", 1.0)  # a global of a function forward calls
    assert fingerprint(Gained()) not in (first, None)
    monkeypatch.setattr(sys.modules[__name__], "OFFSET", 0.0)
    changes = [lambda m: m.options.update(act=functools.partial(torch.nn.functional.leaky_relu, negative_slope=0.2)),
               lambda m: setattr(m.tied, "weight", m.linear.weight),
               lambda m: setattr(m.linear, "weight", nn.Parameter(m.linear.weight.detach().t().contiguous().t()))]
    for change in changes:
        changed = Gained()
        change(changed)
        assert fingerprint(changed) != first
    unknown = Gained()
    unknown.connection = sqlite3.connect(":memory:")  # state in C code: no fingerprint, the run exports itself
    assert fingerprint(unknown) is None
    unknown.connection.close()


def test_weights_that_cannot_be_sent_leave_the_run_exporting_itself(
        tracking_uri, experiment, exports, scratch, monkeypatch):
    import errno

    real = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith("weights.part"):  # the temporary folder's disk is full
            Path(f).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    trained(tracking_uri, experiment)
    assert exports.count(os.getpid()) == 1
    assert forks_of(os.getpid()) == [] and list(scratch.glob("optiflow-export-*")) == []


class Retier:
    """A plugin replacing weights at run end by tied or strided ones (the same shapes; the program's bytes differ)."""

    def __init__(self, how: str) -> None:
        self.how = how

    @hookimpl
    def optiflow_run_end(self, run, status):
        first, second = [m for m in run.model.modules() if isinstance(m, nn.Linear) and m.weight.shape == (16, 16)]
        if self.how == "tied":
            second.weight = first.weight
        else:
            second.weight = nn.Parameter(second.weight.detach().t().contiguous().t())


@pytest.mark.parametrize("how", ["tied", "strided"])
def test_weights_tied_or_strided_at_run_end_are_exported_by_the_run_as_they_ended(
        how, plugin, tracking_uri, experiment, scratch, tmp_path, monkeypatch):
    plugin(Retier(how), "retier")
    settings = {"data": "diabetes", "model": "mlp:hidden=(16,16,16)"}
    ahead = trained(tracking_uri, experiment, **settings)
    monkeypatch.setenv("OPTIFLOW_EXPORT_AHEAD", "0")
    itself = trained(tracking_uri, experiment, **settings)
    assert program_bytes(tracking_uri, ahead, tmp_path / "a") == program_bytes(tracking_uri, itself, tmp_path / "b")


@pytest.mark.parametrize("word", ["0", "false", "off", "no", " OFF "])
def test_the_switch_is_off_for_any_false_word_as_every_optiflow_switch(word, tracking_uri, experiment, exports,
                                                                       monkeypatch):
    monkeypatch.setenv("OPTIFLOW_EXPORT_AHEAD", word)
    trained(tracking_uri, experiment, epochs=1)
    assert exports.count(os.getpid()) == 1, "the run exported its model itself"


@pytest.mark.parametrize("call", ["pipe", "mkdtemp"])
def test_a_fork_that_cannot_start_leaves_the_run_exporting_itself(call, tracking_uri, experiment, exports, scratch,
                                                                  monkeypatch):
    import errno

    owner = os if call == "pipe" else tempfile
    real = getattr(owner, call)

    def refused(*args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__") == "optiflow.export_ahead":  # the fork's, not MLflow's
            raise OSError(errno.EMFILE, "Too many open files")  # a process at its limit of open files
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, call, refused)
    trained(tracking_uri, experiment, epochs=1)
    assert exports.count(os.getpid()) == 1 and list(scratch.glob("optiflow-export-*")) == []


class Lazy:
    """A plugin adding a lazy layer (its weights made by the first forward) to the model as the run starts."""

    @hookimpl
    def optiflow_run_start(self, run):
        run.model.append(nn.LazyLinear(1))


def test_a_model_with_weights_not_yet_made_trains_and_exports_itself(plugin, tracking_uri, experiment, exports):
    plugin(Lazy(), "lazy")
    trained(tracking_uri, experiment, data="diabetes", epochs=1)
    assert exports.count(os.getpid()) == 1


RELU = torch.nn.functional.relu


class PatchedLibrary:
    """A plugin changing what the model computes where no fingerprint looks: torch's own ``F.relu``, at run end
    (and back at the next run's start)."""

    def __init__(self, monkeypatch) -> None:
        self.monkeypatch = monkeypatch

    @hookimpl
    def optiflow_run_start(self, run):
        self.monkeypatch.setattr(torch.nn.functional, "relu", RELU)

    @hookimpl
    def optiflow_run_end(self, run, status):
        self.monkeypatch.setattr(torch.nn.functional, "relu", lambda x, inplace=False: torch.sigmoid(x))


def test_a_program_that_no_longer_computes_what_the_model_does_is_not_logged(
        plugin, tracking_uri, experiment, exports, scratch, tmp_path, monkeypatch):
    """The fork's program is checked against the run's outputs on the example: a change the fingerprint cannot
    see (a library function patched) leaves the run exporting the model as it ended."""
    from optiflow import export

    plugin(PatchedLibrary(monkeypatch), "patched-library")
    ahead = trained(tracking_uri, experiment)
    assert exports.count(os.getpid()) == 1, "the fork's program computed relu: the run exported itself"
    assert "sigmoid" in export.load_program(f"runs:/{ahead}/model").graph_module.code
    monkeypatch.setenv("OPTIFLOW_EXPORT_AHEAD", "0")
    itself = trained(tracking_uri, experiment)
    assert program_bytes(tracking_uri, ahead, tmp_path / "a") == program_bytes(tracking_uri, itself, tmp_path / "b")


class Counter(nn.Module):
    """A layer counting its calls in a buffer, in eval mode too (a plugin's running statistic, say)."""

    calls: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls.add_(1)
        return x


class Counting:
    """A plugin appending a :class:`Counter` to the model as the run starts."""

    @hookimpl
    def optiflow_run_start(self, run):
        run.model.append(Counter())


def test_a_program_that_mutates_its_buffers_is_logged_with_the_buffers_the_run_sent(
        plugin, tracking_uri, experiment, exports, scratch, tmp_path, monkeypatch):
    """The fork's check that its program computes the run's outputs runs the program: what the program's forward
    writes to its buffers (a counter) must not reach the program it writes."""
    plugin(Counting(), "counting")
    ahead = trained(tracking_uri, experiment, data="diabetes", epochs=1)
    assert exports.count(os.getpid()) == 0, "the fork's program was logged"
    monkeypatch.setenv("OPTIFLOW_EXPORT_AHEAD", "0")
    itself = trained(tracking_uri, experiment, data="diabetes", epochs=1)
    assert program_bytes(tracking_uri, ahead, tmp_path / "a") == program_bytes(tracking_uri, itself, tmp_path / "b")
