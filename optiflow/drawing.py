"""Figures drawn beside the run: a helper process draws a run's pictures while the run's own process goes on, so
matplotlib never loads in the run's process and the drawing overlaps the model's export.

A figure drawn this way is a :class:`Recipe`: the name of a function that returns a matplotlib figure, and its
arguments as JSON values.  One helper serves the whole process (``python -c`` running :func:`main`); it starts
when the first run that logs figures starts (and imports matplotlib while that run trains, on another core).
Each run's :class:`Drawer` sends it recipes, one short JSON line each naming the file that holds it, and at
the run's end waits for its own files.
The helper saves each figure as a PNG, whole or not at all, and marks a figure it could not draw; such a figure
(or one a helper that could not start, died or took longer than :data:`WAIT_SECONDS` left undrawn) is drawn in
the run's own process, so what fails raises there, as it always did.  The helper runs in its own session
(Ctrl-C at the terminal reaches the run, which decides what stops), prints nothing, and ends when the run's
process closes its input or goes away, removing the figures nobody collected.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: how long a run waits at its end for its figures before it draws what is left itself
WAIT_SECONDS = 120.0
_EXIT_SECONDS = 1.0  # how long this process's exit waits for an idle helper to end (it removes what is left)
#: the helper's code: without the working directory ``python -c`` puts first on its path (the run's path follows)
_HELPER = "import sys\nif sys.path[0] == '':\n    del sys.path[0]\nfrom optiflow.drawing import main; main()"
_FAILED = ".failed"  # beside a figure the helper could not draw


@dataclass(frozen=True)
class Recipe:
    """A figure as ``function`` (``"package.module:name"``, returning a matplotlib ``Figure``) and its keyword
    arguments (JSON values: numbers, NaN included, text, lists and dicts)."""

    function: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def make(self) -> Figure:
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)(**self.kwargs)

    def save(self, path: Path) -> None:
        """Draw the figure and save it to ``path`` (PNG), closing it."""
        from optiflow.plots import pyplot

        figure = self.make()
        try:
            figure.savefig(path)
        finally:
            pyplot().close(figure)


class _Helper:
    """The process's drawing helper: started once, restarted after it died; requests are JSON lines."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.fed: set[int] = set()  #: the helpers that were asked to draw (a helper that was not is just killed)

    def start(self) -> None:
        with self.lock:
            if self.alive():
                return
            path = os.pathsep.join(sys.path)  # this process's modules, plugins' included
            try:
                self.process = subprocess.Popen([sys.executable, "-c", _HELPER], stdin=subprocess.PIPE,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                env={**os.environ, "PYTHONPATH": path}, start_new_session=True)
            except OSError:
                self.process = None
            else:
                atexit.register(self.close, self.process)

    def close(self, process: subprocess.Popen[bytes]) -> None:
        """At this process's exit: end the helper's input and let it end; one still drawing after a second (what
        it draws is no longer wanted), one never asked to draw (a command that failed early) or a Ctrl-C meanwhile
        stops it."""
        with contextlib.suppress(OSError, ValueError):
            process.stdin.close()  # type: ignore[union-attr]
        try:
            process.wait(_EXIT_SECONDS if process.pid in self.fed else 0)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            process.kill()
            process.wait()
        for folder in list(_STAGING):  # a stopped helper removed nothing: the figures of runs never collected
            shutil.rmtree(folder, ignore_errors=True)

    def send(self, request: bytes) -> bool:
        """Whether the helper took the request (a JSON line)."""
        with self.lock:
            if self.process is None or not self.alive():  # the first test narrows the type for mypy
                return False
            try:
                stdin: IO[bytes] = self.process.stdin  # type: ignore[assignment]
                stdin.write(request)
                stdin.flush()
                self.fed.add(self.process.pid)
                return True
            except (OSError, ValueError):
                return False

    def alive(self) -> bool:
        process = self.process
        return process is not None and process.poll() is None

    def stop(self) -> None:
        """Kill the helper (it hangs): the next run starts another."""
        with self.lock:
            process, self.process = self.process, None
        if process is not None:
            with contextlib.suppress(OSError):
                process.kill()
            process.wait()


_HELPER_PROCESS = _Helper()
_STAGING: set[Path] = set()  #: the staging folders of this process's runs not yet collected


def start_helper() -> None:
    """Make sure this process's drawing helper runs: a command that will draw starts it before its own imports,
    a run that logs figures when it opens (:meth:`Drawer.start`)."""
    _HELPER_PROCESS.start()


class Drawer:
    """One run's figures: drawn by the helper (:meth:`start`), else by :meth:`finished` in this process."""

    def __init__(self) -> None:
        self.staging: Path | None = None  #: where this run's figures are drawn to, one folder each
        self.queued: list[tuple[Recipe, Path, str, bool]] = []  #: recipe, file, artifact name, sent to the helper

    def start(self) -> None:
        """Make sure the helper runs: started now, it imports matplotlib while the run trains."""
        start_helper()

    def draw(self, recipe: Recipe, artifact_file: str) -> None:
        """Ask for ``recipe`` drawn as ``artifact_file``; :meth:`finished` hands over the file."""
        if self.staging is None:
            self.staging = Path(tempfile.mkdtemp(prefix="optiflow-figures-"))
            _STAGING.add(self.staging)
        path = self.staging / str(len(self.queued)) / Path(artifact_file).name
        try:
            request = json.dumps({"function": recipe.function, "kwargs": recipe.kwargs, "path": str(path),
                                  "sys_path": sys.path})
        except TypeError as exc:
            raise TypeError(f"the arguments of figure {recipe.function!r} must be JSON values: {exc}") from None
        path.parent.mkdir()
        (asked := path.parent / "request.json").write_text(request)  # a short line never waits on a busy helper
        self.start()
        line = json.dumps({"request": str(asked), "staging": str(self.staging)}).encode() + b"\n"
        self.queued.append((recipe, path, artifact_file, _HELPER_PROCESS.send(line)))

    @contextlib.contextmanager
    def finished(self) -> Iterator[tuple[list[tuple[Path, str]], dict[str, Exception]]]:
        """Wait for the helper's figures and draw here what it did not; yields the file and artifact name of each
        figure drawn, in the order asked for, and the error of each that could not be, by artifact name.  The
        files are gone when the block ends.  A Ctrl-C before the block leaves the figures queued (the run's end
        collects them) and no figure half drawn."""
        self._wait()
        drawn, failed = [], {}
        for recipe, path, name, _ in self.queued:
            try:
                if not path.is_file():
                    _save_whole(recipe, path)
                drawn.append((path, name))
            except Exception as exc:
                failed[name] = exc
        try:
            yield drawn, failed
        finally:
            self.close()

    def collect_ending(self, log_artifact: Callable[[Path, str | None], None]) -> KeyboardInterrupt | None:
        """As the run ends: log each figure (``log_artifact(file, folder)``) once drawn; one that cannot be drawn
        or logged is left out.  A Ctrl-C meanwhile stops the wait: the figures drawn so far are logged and the
        interruption returned."""
        try:
            with contextlib.suppress(Exception), self.finished() as (drawn, _):
                for path, name in drawn:
                    log_artifact(path, os.path.dirname(name) or None)
        except KeyboardInterrupt as exc:
            with contextlib.suppress(Exception):
                for _, path, name, _ in self.queued:
                    if path.is_file():
                        log_artifact(path, os.path.dirname(name) or None)
            self.close()
            return exc
        return None

    def close(self) -> None:
        """Forget this run's figures and remove their files."""
        self.queued.clear()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            _STAGING.discard(self.staging)
            self.staging = None

    def _wait(self) -> None:
        """Until each figure sent to the helper is drawn or marked failed, the helper died, or the wait is over."""
        waiting = [path for _, path, _, sent in self.queued if sent]
        deadline, delay = time.monotonic() + WAIT_SECONDS, 0.002
        while waiting:
            waiting = [p for p in waiting if not p.is_file() and not p.with_name(p.name + _FAILED).exists()]
            if not waiting or not _HELPER_PROCESS.alive():
                return
            if time.monotonic() > deadline:
                _HELPER_PROCESS.stop()
                return
            time.sleep(delay)
            delay = min(2 * delay, 0.02)


def main() -> None:
    """The helper: import matplotlib, then draw each requested figure (a JSON line: ``request``, a file holding
    function, kwargs, path and ``sys_path``, and ``staging``) to its path, whole or not at all, or mark it failed.
    Ends at the end of its input, removing what is left in the runs' staging folders (their figures were
    collected, or their process died)."""
    import gc

    gc.disable()  # a short-lived process drawing a few figures: nothing to collect
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from optiflow.plots import pyplot

    pyplot()
    staging: set[str] = set()
    try:
        for line in sys.stdin.buffer:
            asked = json.loads(line)
            staging.add(asked["staging"])
            try:
                request = json.loads(Path(asked["request"]).read_text())
            except OSError:  # the run collected its figures already
                continue
            sys.path[:0] = [entry for entry in request["sys_path"] if entry not in sys.path]
            _draw(Recipe(request["function"], request["kwargs"]), Path(request["path"]))
    finally:
        for folder in staging:
            shutil.rmtree(folder, ignore_errors=True)


def _draw(recipe: Recipe, path: Path) -> None:
    try:
        _save_whole(recipe, path)
    except Exception:
        with contextlib.suppress(OSError):
            path.with_name(path.name + _FAILED).touch()


def _save_whole(recipe: Recipe, path: Path) -> None:
    """Save the figure to ``path`` whole or not at all."""
    partial = path.with_name(f".{path.stem}.part{path.suffix}")  # the suffix names the format
    try:
        recipe.save(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
