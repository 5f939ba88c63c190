"""A run's model traced while it trains: a fork of the run's process exports it on the other core, and writes the
program with the trained weights when the run logs its model.

Why: ``torch.export`` takes about 0.35 s of a default ``optiflow train``'s 4.5 s, all of it after training, on one
core of two.  What it traces does not depend on the weights: an exported program holds the module's own parameter
and buffer tensors (``ExportedProgram.state_dict`` is the module's ``state_dict(keep_vars=True)``), so a copy traced
before training takes the trained weights in place and writes the program the run would have exported.

How the program stays the one the run would export:

- The fork builds the logged pipeline as the run's end does and exports it through the same function
  (:func:`optiflow.export.traced_beside`), so through MLflow's own ``torch.export.export`` call; it stops at
  ``torch.export.save`` and waits there.
- When the run logs its model, it sends the pipeline's weights and a fingerprint of everything else a trace may read
  (:func:`optiflow.fingerprint.fingerprint`: module types, ``forward`` code, attributes, tensors that are not
  weights, hooks, modes).  The fork writes the program only when the fingerprint is the one it traced (a plugin that
  changed the model while it trained gets an export of the model as it ended), with every tensor of the program
  equal to the weights sent, and only when the program computes the run's outputs on the example (a change no
  fingerprint sees, torch's own functions patched say, is caught there).
- The run's own ``torch.export.export`` call (MLflow's) gets the fork's program only when its arguments are the ones
  the fork traced with: the example tensors bit for bit, the same dynamic shapes.
- Anything else (the fork failed, died, used no CPU for 2 s, took a minute, is stale): the run exports itself, as
  it always did.  What the fork's export printed (stdout, stderr) the run prints when it uses the fork's program.

Used for a run on the CPU that logs its model, on Linux, from the main thread, not data-parallel, with data and
model of at most :data:`SMALL_DATA_BYTES` together (a run with more trains long enough that its export is a small
part of it, and a fork of a big process costs its page tables, and counts that process's memory again), unless
``OPTIFLOW_EXPORT_AHEAD`` is a false word (``0``, ``off``).  The fork is killed when the run ends in any other way
(an error, Ctrl-C); it dies with the run's process."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from optiflow.fingerprint import describe, fingerprint
from optiflow.values import env_flag

if TYPE_CHECKING:
    from torch.export import ExportedProgram

    from optiflow.run import Run

ENVIRONMENT = "OPTIFLOW_EXPORT_AHEAD"
STUCK_SECONDS = 2.0  #: a fork that used no CPU for this long while the run waits for it is given up
WAIT_SECONDS = 60.0  #: nor does the run wait longer than this for a fork that works (then it exports itself)
OUTPUT_RTOL, OUTPUT_ATOL = 1e-5, 1e-6  #: how close the fork's program computes the run's outputs on the example
POLL_SECONDS = 0.005
SMALL_DATA_BYTES = 64 * 2**20  #: a run whose splits and model hold more is not traced beside it


class _Saved(Exception):
    """Ends the fork's ``save_model`` call once its program is written."""


class Ahead:
    """The fork tracing one run's model; :meth:`program` is what the run's export call gets from it."""

    def __init__(self, pid: int, folder: Path, command: int) -> None:
        self.pid, self.folder, self.command = pid, folder, command
        self.sent, self.ended = False, False

    def send(self, module: nn.Module, outputs: Tensor) -> None:
        """The pipeline as it ended: its weights and fingerprint, and its ``outputs`` on the example, for the fork to
        write its program with (weights that cannot be written, a full disk say, are not sent: the run exports
        itself)."""
        part = self.folder / "weights.part"
        try:
            torch.save({"weights": module.state_dict(), "fingerprint": fingerprint(module), "outputs": outputs}, part)
            part.rename(self.folder / "weights.pt")
        except Exception:  # noqa: BLE001 - whatever failed here, the run's own export is what it always was
            part.unlink(missing_ok=True)
            return
        with contextlib.suppress(OSError):
            os.write(self.command, b"w")
            self.sent = True

    def program(self, args: tuple[object, ...], kwargs: dict[str, object]) -> Path | None:
        """The fork's program file when it exported these arguments and wrote the weights sent, else None."""
        if not self.sent or not self._wait():
            return None
        try:
            result = json.loads((self.folder / "result.json").read_text())
        except (OSError, ValueError):
            return None
        if result.get("arguments") != arguments_digest(args, kwargs) or not (self.folder / "model.pt2").is_file():
            return None
        for name, stream in (("export.out", sys.stdout), ("export.log", sys.stderr)):
            with contextlib.suppress(OSError, ValueError):
                printed = (self.folder / name).read_text(errors="replace")
                if printed:
                    stream.write(printed)
                    stream.flush()
        return self.folder / "model.pt2"

    def _wait(self) -> bool:
        """Wait for the fork to end while it works (at most :data:`WAIT_SECONDS`); whether it ended by itself,
        successfully."""
        if not self.pid:
            return self.ended
        cpu, progressed = _cpu_seconds(self.pid), time.monotonic()
        deadline = progressed + WAIT_SECONDS
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid:
                self.pid, self.ended = 0, os.waitstatus_to_exitcode(status) == 0
                return self.ended
            now, used = time.monotonic(), _cpu_seconds(self.pid)
            if used is None or now > deadline:
                return False
            if used != cpu:
                cpu, progressed = used, now
            elif now - progressed > STUCK_SECONDS:
                return False
            time.sleep(POLL_SECONDS)

    def close(self) -> None:
        """Stop the fork if it still runs and remove its folder."""
        with contextlib.suppress(OSError):
            os.close(self.command)
        if self.pid:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0
        shutil.rmtree(self.folder, ignore_errors=True)


def _cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds process ``pid`` has used (/proc), None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wanted(run: Run, log_model: bool) -> bool:
    """Whether ``run`` gets its model traced beside it (see the module's docstring)."""
    from torch.nn.parameter import is_lazy

    from optiflow import distributed

    tracker = run.tracker
    return (log_model and env_flag(ENVIRONMENT, default=True) and sys.platform.startswith("linux")
            and threading.current_thread() is threading.main_thread()
            and run.device.type == "cpu" and not distributed.current().enabled
            and tracker is not None and getattr(tracker, "run_id", None) is not None
            and not any(map(is_lazy, [*run.model.parameters(), *run.model.buffers()]))  # its weights made
            and _bytes(run) <= SMALL_DATA_BYTES)


def _bytes(run: Run) -> int:
    """What the run's data and model hold: what a fork of its process holds again as the run rewrites it (the
    model several times: its copy to trace, the weights sent, the pages training rewrites)."""
    tensors = [*run.splits.tensors(), *run.model.parameters(), *run.model.buffers()]
    return sum(t.element_size() * t.numel() for t in tensors)


#: what the fork traces: ``pipeline(run)`` gives the module to log and a function saving it to a path
Pipeline = Callable[["Run"], tuple[nn.Module, Callable[[str], None]]]


@contextlib.contextmanager
def beside(run: Run, log_model: bool, pipeline: Pipeline) -> Iterator[Ahead | None]:
    """While open, a fork traces the model ``run`` will log (None when it is not wanted or cannot start)."""
    ahead = start(run, pipeline) if wanted(run, log_model) else None
    try:
        yield ahead
    finally:
        if ahead is not None:
            ahead.close()


def start(run: Run, pipeline: Pipeline) -> Ahead | None:
    """Fork the process to trace ``run``'s model; None when the fork cannot start (no temporary folder, no file
    descriptor or memory left)."""
    folder: Path | None = None
    pipe: tuple[int, ...] = ()
    parent = os.getpid()
    try:
        folder = Path(tempfile.mkdtemp(prefix="optiflow-export-"))
        read, write = pipe = os.pipe()
        pid = os.fork()
    except OSError:
        for fd in pipe:
            os.close(fd)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        return None
    if pid == 0:  # the fork: never returns
        code = 1
        try:
            _child_setup(parent, folder, read, write)
            code = _trace(run, pipeline, folder, read)
        finally:
            if os.getppid() != parent:  # the run's process is gone: nobody else removes the folder
                shutil.rmtree(folder, ignore_errors=True)
            os._exit(code)
    os.close(read)
    return Ahead(pid, folder, write)


def _child_setup(parent: int, folder: Path, read: int, write: int) -> None:
    """The fork lets go of what is the run's: no signals of its own, the run's files and sockets closed, its own
    stderr, one thread, its temporary files in its folder (the run removes it); it dies with the run's
    process, or with its terminal (and removes its folder)."""
    gc.freeze()  # the collector never looks at the run's objects (no finalizer of its database connections runs)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tempfile.tempdir = str(folder)  # an export's staging folders (MLflow's, optiflow's): the fork is killed in them

    def gone(*_: object) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(1)

    signal.signal(signal.SIGTERM, gone)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:  # its terminal closed (not under nohup)
        signal.signal(signal.SIGHUP, gone)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        gone()
    os.close(write)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    os.closerange(3, read)
    os.closerange(read + 1, _highest_fd())
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the fork's own stdio objects, not the run's
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    torch.set_num_threads(1)  # at the run's own priority: when the run waits for it, it waits for nothing else


def _highest_fd() -> int:
    try:
        return max(int(name) for name in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")


def _trace(run: Run, pipeline: Pipeline, folder: Path, command: int) -> int:
    """In the fork: save the pipeline as the run will (:func:`optiflow.export.save_model`), waiting for the trained
    weights at ``torch.export.save``; write the program with them; 0 when it was written."""
    module, save_to = pipeline(run)
    traced = fingerprint(module)
    if traced is None:  # the model holds state the fingerprint cannot describe: the run exports it itself
        return 1
    real_export, real_save = torch.export.export, torch.export.save
    found: dict[str, str] = {}
    inputs: list[object] = []

    def trace(mod: nn.Module, args: tuple[object, ...], *rest: object, **kwargs: object) -> ExportedProgram:
        found["arguments"] = arguments_digest(args, kwargs) if mod is module and not rest else ""
        inputs[:] = args
        with _printed_to(folder / "export.out", folder / "export.log"):
            return real_export(mod, args, *rest, **kwargs)  # type: ignore[arg-type]

    def save(program: ExportedProgram, *_: object, **__: object) -> None:
        weights = _await_weights(folder, command)
        if weights is None or weights["fingerprint"] != traced or not found.get("arguments"):
            raise _Saved
        module.load_state_dict(weights["weights"], strict=True)
        state = program.state_dict
        if not all(name in weights["weights"] and torch.equal(tensor, weights["weights"][name])
                   for name, tensor in state.items()) or not _computes(program, inputs, weights["outputs"]):
            raise _Saved
        real_save(program, folder / "model.part")
        (folder / "model.part").rename(folder / "model.pt2")
        (folder / "result.json").write_text(json.dumps(found))
        raise _Saved

    torch.export.export, torch.export.save = trace, save  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(dir=folder) as scratch, contextlib.suppress(_Saved):
        save_to(os.path.join(scratch, "model"))
    return 0 if (folder / "result.json").is_file() else 1


def _computes(program: ExportedProgram, inputs: list[object], outputs: Tensor) -> bool:
    """Whether ``program`` computes on ``inputs`` what the run's module computed (``outputs``): the last check that
    the trace is not stale (state the fingerprint does not see: torch's global settings, a library patched)."""
    try:
        with torch.no_grad():
            computed = copy.deepcopy(program.module())(*inputs)  # what its forward writes (a buffer) not saved
        return isinstance(computed, Tensor) and computed.shape == outputs.shape and \
            torch.allclose(computed, outputs, rtol=OUTPUT_RTOL, atol=OUTPUT_ATOL, equal_nan=True)
    except Exception:  # noqa: BLE001 - a program that cannot run here is not the one to log
        return False


def _await_weights(folder: Path, command: int) -> dict[str, Any] | None:
    """Block until the run sends the weights (None when it ends without: its end of the pipe closed)."""
    if os.read(command, 1) != b"w":
        return None
    return torch.load(folder / "weights.pt", weights_only=True)


@contextlib.contextmanager
def _printed_to(out: Path, err: Path) -> Iterator[None]:
    """The fork's file descriptors 1 and 2 (``sys.stdout``, ``sys.stderr``) written to ``out`` and ``err`` while
    open: what the export prints, for the run to print when it uses the fork's program."""
    streams = ((1, sys.stdout, out), (2, sys.stderr, err))
    saved = []
    for fd, stream, path in streams:
        stream.flush()
        saved.append(os.dup(fd))
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(target, fd)
        os.close(target)
    try:
        yield
    finally:
        for (fd, stream, _), kept in zip(streams, saved, strict=True):
            stream.flush()
            os.dup2(kept, fd)
            os.close(kept)


@contextlib.contextmanager
def exporting(ahead: Ahead | None, module: nn.Module, outputs: Tensor) -> Iterator[None]:
    """While open (the run's :func:`optiflow.export.save_model`), an export of ``module`` (which computed ``outputs``
    on the example) is the fork's program when it has the one the call asks for; every other call, and every other
    case, is torch's own."""
    if ahead is None:
        yield
        return
    ahead.send(module, outputs)
    real_export, real_save = torch.export.export, torch.export.save

    def export(mod: nn.Module, args: tuple[object, ...], *rest: object, **kwargs: object) -> object:
        if mod is module and not rest:
            path = ahead.program(args, kwargs)
            if path is not None:
                return Program(path, torch.export.load)
        return real_export(mod, args, *rest, **kwargs)  # type: ignore[arg-type]

    def save(program: object, f: object, *rest: object, **kwargs: object) -> None:
        if isinstance(program, Program) and not rest and not kwargs and isinstance(f, (str, os.PathLike)):
            shutil.copyfile(program.path, f)
            return
        real_save(program.loaded() if isinstance(program, Program) else program, f, *rest, **kwargs)  # type: ignore[arg-type]

    torch.export.export, torch.export.save = export, save  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.export.export, torch.export.save = real_export, real_save


class Program:
    """The fork's exported program, as its file; anything else asked of it is the program, loaded."""

    def __init__(self, path: Path, load: Callable[[str], ExportedProgram]) -> None:
        self.path, self._load = path, load
        self._program: ExportedProgram | None = None

    def loaded(self) -> ExportedProgram:
        if self._program is None:
            self._program = self._load(str(self.path))
        return self._program

    def __getattr__(self, name: str) -> object:
        return getattr(self.loaded(), name)


def arguments_digest(args: tuple[object, ...], kwargs: dict[str, object]) -> str:
    """SHA-256 of an export call's arguments: each tensor's dtype, shape and bytes, the rest as ``repr``; empty when
    an argument cannot be described."""
    described = [describe(value) for value in args]
    if None in described:
        return ""  # arguments it cannot describe: never the fork's program
    digest = hashlib.sha256()
    for text in described:
        digest.update(str(text).encode())
    digest.update(repr(sorted(kwargs.items(), key=lambda item: item[0])).encode())
    return digest.hexdigest()
