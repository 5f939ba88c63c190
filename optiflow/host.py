"""Host settings for training on the CPU: how many threads a run computes on, and malloc.

glibc's malloc serves large blocks with ``mmap`` and hands them back to the
kernel on ``free``: a CPU training step, whose activations are tens of MB,
then page-faults every page of them in again, step after step (thousands of
minor faults per step for the benchmark CNN at batch 256).  Raising malloc's
mmap and trim thresholds keeps freed blocks in the heap for the next step, as
the CUDA caching allocator does on the GPU and as jemalloc/tcmalloc (the
allocators PyTorch's CPU tuning guide recommends) do by default.  The cost is
that the process keeps its peak heap instead of returning it between steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib
import os
import sys
from collections.abc import Iterable, Iterator

from optiflow.values import env_flag

#: mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap and stay there when freed
KEEP_BYTES = 1 << 30
#: set to a false word (0, off, false, no) to leave the C library's allocator as it is
ENV_SWITCH = "OPTIFLOW_MALLOC_TUNING"


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks below 1 GiB for reuse, once per process.

    Returns whether the allocator was tuned: False off glibc (macOS, Windows,
    musl), or when ``OPTIFLOW_MALLOC_TUNING`` is a false word (``0``, ``off``, ``false``, ``no``).
    """
    if not env_flag(ENV_SWITCH, default=True) or not _glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` PyTorch CPU threads (None: as they are), restored after it."""
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Run the block with PyTorch's deterministic algorithms only (``--deterministic``), restored after it:
    an operation without one raises instead of computing a result that varies from run to run."""
    if not enabled:
        yield
        return
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs (CUDA docs)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


#: modules an import must add for the objects it made to be frozen at the next full collection
IMPORT_WAVE = 25
#: the youngest generation's threshold while the command waits for its imports to end (CPython's default is
#: 700): a command that never trains still collects once this many more objects are alive, and then as usual
PAUSED_THRESHOLD = 1_000_000


class _ImportedObjectsFreezer:
    """A ``gc.callbacks`` entry: after a full collection that follows an import of at least :data:`IMPORT_WAVE`
    modules, what survived it is frozen (``gc.freeze``); while paused (:func:`imports_ahead`), the collector
    waits.  See :func:`scan_imported_objects_once`."""

    def __init__(self) -> None:
        self.modules = len(sys.modules)
        #: the thresholds to restore while paused, else None
        self.normal: tuple[int, int, int] | None = None
        #: the thresholds the pause set (restored only if nobody changed them meanwhile: a plugin's stay)
        self.paused: tuple[int, int, int] | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase != "stop":
            return
        self.resume(freeze=False)  # a collection while paused (the safety valve): collect as usual from now on
        if info.get("generation") == 2 and len(sys.modules) >= self.modules + IMPORT_WAVE:
            self.freeze()

    def freeze(self) -> None:
        self.modules = len(sys.modules)
        gc.freeze()

    def pause(self) -> bool:
        if self.normal is not None:
            return False
        self.normal = gc.get_threshold()
        youngest = self.normal[0] if not 0 < self.normal[0] < PAUSED_THRESHOLD else PAUSED_THRESHOLD  # 0: off
        self.paused = (youngest, *self.normal[1:])
        gc.set_threshold(*self.paused)
        return True

    def resume(self, freeze: bool = True) -> None:
        normal, paused = self.normal, self.paused  # taken first: a collection in another thread may resume too
        if normal is None:
            return
        self.normal = self.paused = None
        if freeze and len(sys.modules) >= self.modules + IMPORT_WAVE:
            self.freeze()
        if gc.get_threshold() == paused:
            gc.set_threshold(*normal)


def _freezer() -> _ImportedObjectsFreezer | None:
    return next((callback for callback in gc.callbacks if isinstance(callback, _ImportedObjectsFreezer)), None)


def scan_imported_objects_once() -> None:
    """Have the garbage collector scan the objects imports make at most once, not at every later collection.

    CPython collects its youngest objects every 700 new ones and runs a full collection each time the objects it
    tracks grow by a quarter: importing torch, ``torch._dynamo``, MLflow's store, matplotlib and ``torch.export``
    makes about 650,000 (classes, functions, module namespaces) that live as long as the process, each scanned
    again and again in a default ``optiflow train``.  From this call on:

    - until a training command has imported what its runs need first (:func:`imports_done`), the collector
      waits (:data:`PAUSED_THRESHOLD`): what those imports make is not scanned at all, and frozen
      (``gc.freeze``) before any run exists; it waits again while a run exports and plots
      (:func:`imports_ahead`), then goes on as usual;
    - the survivors of a full collection that follows an import wave elsewhere are frozen.

    Frozen objects are still freed by reference counting; collections skip them.  A freeze takes every object
    alive then, a run in progress included (imports happen at each module's first use, which can be mid-run): a
    reference cycle alive at a freeze that becomes garbage later is not reclaimed until the process ends (after
    a pause, also a cycle that was already garbage).  Import waves are finite, so what is kept does not grow with
    trials or epochs.  Called once, by the ``optiflow`` command, which owns its process."""
    if _freezer() is None:
        freezer = _ImportedObjectsFreezer()
        gc.callbacks.append(freezer)
        freezer.pause()


def imports_done(ahead: Iterable[str] = (), *, freeze: bool = True) -> None:
    """The command's imports are over for now: import the modules ``ahead`` (what its first run imports anyway,
    :func:`optiflow.stores.run_imports`), then end the pause, freezing what an import wave made without scanning
    it.  The commands that train call it first, before any run exists: a reference cycle an import leaves (a
    traceback caught inside a library holds its frames, and they their locals) then holds no run's data or
    model.  ``freeze=False`` (a training starts, its run alive) ends the pause without a freeze.  A module that
    fails to import here fails again, and is said, where it is used.  Nothing outside the ``optiflow`` command
    (:func:`scan_imported_objects_once`)."""
    freezer = _freezer()
    if freezer is None or freezer.normal is None:
        return
    for name in ahead:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: S110 - imported again where it is used, which says what is wrong
            pass
    freezer.resume(freeze)


@contextlib.contextmanager
def imports_ahead() -> Iterator[None]:
    """While open (a run's end: its figures and the model's export import matplotlib and ``torch.export``), the
    ``optiflow`` command's collector waits, then goes on as usual: nothing is frozen as it closes (the export
    leaves reference cycles around the run's model; a full collection later reclaims them, then freezes the
    wave).  A ``train`` ends right after, so what its end imports is never scanned.  Nothing outside the
    command."""
    freezer = _freezer()
    paused = freezer is not None and freezer.pause()
    try:
        yield
    finally:
        if freezer is not None and paused:
            freezer.resume(freeze=False)


def exit_process(code: object) -> None:
    """End the process with ``code`` once everything it started has finished, without tearing the interpreter
    down.  ``code`` is a ``SystemExit`` code: None is 0; text is said on stderr and is 1.

    Python's own exit tells idle thread pools to stop and joins the threads it must wait for, runs the ``atexit``
    handlers (MLflow's, logging's, ``weakref.finalize``, multiprocessing's), then frees every module one by one:
    after torch and MLflow are imported that teardown alone takes 0.5-0.9 s of a command's wall time, and writes
    nothing.  This does the first two steps, flushes the standard streams, and leaves the rest to the operating
    system.
    """
    import atexit
    import threading

    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    # What the interpreter's exit calls first (wait_for_thread_shutdown): threading's own exit callbacks (they
    # tell idle concurrent.futures workers, such as MLflow's artifact-download pool, to stop), then it joins every
    # non-daemon thread.  Joining the threads alone would wait forever on such a worker.
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except KeyboardInterrupt:  # Ctrl-C while waiting: one line and 130, not the traceback Python's exit prints
        print("Error: interrupted while waiting for the command's threads to finish", file=sys.stderr)
        code = 130
    atexit._run_exitfuncs()
    unwritten = _flush(sys.stdout, "<stdout>")
    if unwritten is not None and not code:  # Python's exit said it and exited 120: one line and 1, as any fault
        print(f"Error: {unwritten}", file=sys.stderr)  # (a command that failed has said its error already)
        code = 1
    _flush(sys.stderr, "<stderr>")
    os._exit(code)


def _flush(stream: object, name: str) -> str | None:
    """Flush a standard stream; what went wrong when output it held is lost (a full disk), else None."""
    from optiflow.errors import no_space

    try:
        stream.flush()  # type: ignore[attr-defined]
    except BrokenPipeError:  # a reader that left (`| head`) has what it wanted
        return None
    except OSError as exc:
        full = no_space(exc, name)
        return str(full) if full is not None else f"could not write {name}: {exc.strerror or exc}"
    except (ValueError, AttributeError):  # a closed stream, or None (a closed file descriptor at start)
        return None
    return None
