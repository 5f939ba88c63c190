"""The MLflow client of a store (one per store and process), checks on the tracking store a user names, the
SQLite store's lock and journal mode, and telling a full disk from other store failures.

Kept apart from :mod:`optiflow.tracking` (which uses them) so that each stays a readable size.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from optiflow.errors import DiskFull, OptiflowError, StoreLost, first_line, no_space, redact

if TYPE_CHECKING:
    from mlflow import MlflowClient


def quiet_artifact_downloads() -> None:
    """Turn MLflow's artifact download progress bar off unless the user set it: stderr holds optiflow's lines
    only (one line even when a download is refused)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


STORE_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def check_scheme(uri: str) -> None:
    """Refuse a URI MLflow has no store for, and a plain path (MLflow's file store, off by default since MLflow 3)."""
    from urllib.parse import urlsplit

    try:
        scheme = urlsplit(uri).scheme.lower()
    except ValueError as exc:
        raise OptiflowError(f"the tracking URI {uri} is not a valid URI ({exc})") from None
    if scheme in ("", "file") or re.match(r"^[a-z]$", scheme):  # a path, or a Windows drive letter
        # MLflow's own reading of its variable (mlflow.environment_variables.MLFLOW_ALLOW_FILE_STORE: "1"/"true",
        # any case), not optiflow's vocabulary: what MLflow accepts decides; its object raises on other words
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true"):
            return
        raise OptiflowError(f"the tracking URI {uri} is a folder (MLflow's file store, which MLflow no longer "
                            f"supports by default); give a database, e.g. sqlite:///{uri.removeprefix('file://')}/mlflow.db")
    if scheme.split("+")[0] not in STORE_SCHEMES:
        raise OptiflowError(f"the tracking URI {uri} has an unknown scheme '{scheme}'; use sqlite:///FILE, "
                            "http(s)://HOST:PORT or a database URL (postgresql://, mysql://, mssql://)")


def check_database_file(path: Path) -> None:
    """Refuse a store path that holds something other than a SQLite database (it would be clobbered or misread).

    Read through sqlite3 itself: closing a plain file handle on the database would drop the
    POSIX locks this process's open connections hold on it.
    """
    import sqlite3
    from urllib.parse import quote

    if not path.exists():
        return
    if not path.is_file():
        raise OptiflowError(f"the tracking store {path} is not a file")
    try:
        connection = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=60)
        try:
            connection.execute("PRAGMA schema_version").fetchone()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise OptiflowError(f"the tracking store {path} exists and is not a SQLite database; "
                                "give --tracking-uri a new file or an optiflow store") from None


@contextlib.contextmanager
def store_lock(path: Path | None) -> Iterator[None]:
    """Hold the SQLite store's ``.lock`` file (processes creating one store take turns); a store where that file
    cannot be written (a read-only file system, no permission) is one line."""
    if path is None or str(path) == ":memory:":
        yield
        return
    try:
        handle = open(str(path) + ".lock", "a")
    except OSError as exc:
        raise OptiflowError(f"cannot write to the tracking store {path}: {exc.strerror} (optiflow writes every run "
                            "it opens; give --tracking-uri a store you can write)") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_identity(uri: str) -> tuple[int, int] | None:
    """The device and inode of a SQLite store's database file (None: not a SQLite file, or not there)."""
    path = _sqlite_file(uri)
    try:
        found = os.stat(path) if path is not None and str(path) != ":memory:" else None
    except OSError:
        return None
    return (found.st_dev, found.st_ino) if found is not None else None


def check_same_file(uri: str, identity: tuple[int, int] | None) -> None:
    """Raise :class:`StoreLost` when the SQLite store a run writes to was deleted or replaced by another file
    (MLflow's open connection would go on writing into the unlinked file, and the run would be lost)."""
    if identity is None:
        return
    now = file_identity(uri)
    if now != identity:
        how = "deleted" if now is None else "replaced by another file"
        raise StoreLost(f"the tracking store {uri} was {how} during the run")


def disk_full(exc: BaseException, fn: Callable[..., object] | None, args: tuple[object, ...],
              store: str = "the tracking store",
              staged: bool = False) -> DiskFull | None:
    """A :class:`DiskFull` when MLflow client call ``fn(*args)`` failed for want of space, else None.
    ``staged``: the call copied files staged elsewhere (a logged model), so the error's file name is
    the source, not where the copy went: name the run's artifact folder.

    SQLite in write-ahead-log mode says "disk I/O error" when it cannot grow its log: on a
    device with under 1 MB free that is a full disk too.
    """
    where = _written(fn, args, OSError() if staged else exc, store)
    full = no_space(exc, where)
    if full is None and "disk I/O error" in str(exc):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(Path(where).parent).free < 10**6:
                full = no_space(OSError(errno.ENOSPC, "No space left"), where)
    return full


def write_whole(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: into a hidden partial file beside it, then renamed
    over it, so that a full disk or a kill mid-write leaves no empty or half-written file.  Raises
    :class:`DiskFull` (exit code 1) when the device is full, else the ``OSError``.  A device or pipe
    (``/dev/stdout``) is written straight."""
    target = Path(path)
    straight = target.exists() and not target.is_file()
    partial = target if straight else target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            if not straight:
                os.fsync(handle.fileno())
        if not straight:
            os.replace(partial, target)
    except OSError as exc:
        if not straight:
            partial.unlink(missing_ok=True)
        raise no_space(exc, target, needed=len(data)) or exc from None


def _written(fn: Callable[..., object] | None, args: tuple[object, ...], exc: BaseException, store: str) -> str | Path:
    """Where a failed client call wrote: the file, else the run's artifact folder (an OSError), else the store."""
    from urllib.parse import unquote, urlparse

    mlflow_client = getattr(fn, "__self__", None)
    if isinstance(exc, OSError) and exc.filename:
        return str(exc.filename)
    if isinstance(exc, OSError) and mlflow_client is not None and args and isinstance(args[0], str):
        with contextlib.suppress(Exception):
            artifacts = urlparse(mlflow_client.get_run(args[0]).info.artifact_uri)
            if artifacts.scheme in ("", "file"):
                return unquote(artifacts.path)
    store = str(getattr(mlflow_client, "tracking_uri", None) or store)
    return _sqlite_file(store) or store


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def use_write_ahead_log(path: Path) -> bool:
    """Switch a SQLite store to WAL (persistent in the file): writers then never block readers.  True when it
    switched now: connections opened before keep SQLite's default ``synchronous`` (see
    :func:`commit_without_waiting_for_the_disk`) and are best closed."""
    import sqlite3

    if str(path) == ":memory:":
        return False
    if not _WAL_STORES:
        import atexit

        atexit.register(_checkpoint_at_exit)
    _WAL_STORES.add(str(path.resolve()))
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as connection:
        if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            connection.execute("PRAGMA journal_mode=WAL")
            return True
    return False


_WAL_STORES: set[str] = set()


def _checkpoint_at_exit() -> None:
    """Copy each WAL store's log into its database file (and to the disk) when the command ends, as closing
    MLflow's connections did in the interpreter's teardown, which optiflow's exit skips: ``mlflow.db`` then holds
    every run by itself (a copy of the file alone has them), not only with its ``-wal`` file beside it.  PASSIVE:
    a store another process is reading is checkpointed as far as it can be, never waited for."""
    import sqlite3

    for path in sorted(_WAL_STORES):
        with contextlib.suppress(sqlite3.Error, OSError), contextlib.closing(sqlite3.connect(path, timeout=1)) as db:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")


def is_server(uri: str) -> bool:
    """Whether ``uri`` is an MLflow tracking server, which serves its own UI."""
    return uri.startswith(("http://", "https://"))


def run_imports(uri: str | None) -> tuple[str, ...]:
    """What a run tracked in ``uri`` (None: the default) imports first: :func:`~optiflow.host.imports_done`."""
    server = is_server(uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
    return ("torch._dynamo", "mlflow.tracking", *(() if server else ("mlflow.store.tracking.sqlalchemy_store",)))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are relative to the cwd)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def commit_without_waiting_for_the_disk() -> None:
    """Every SQLite database this process opens in WAL mode (MLflow's store, once :func:`use_write_ahead_log`
    switched it) commits with ``synchronous=NORMAL``, SQLite's own advice for WAL: a commit no longer waits for
    the disk (~6 ms each on a VM disk, a tracked run makes about seven).  A crashed or killed process loses
    nothing; an operating-system crash or power cut may lose the last commits, never corrupt the store.
    Databases in another journal mode (an Optuna study's) keep SQLite's default."""
    global _RELAXED
    if _RELAXED:
        return
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def on_connect(connection: object, _record: object) -> None:
        if not isinstance(connection, sqlite3.Connection):
            return
        try:
            if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                connection.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError:  # a damaged file: said by the first query, not retried here as a failed connect
            return

    event.listen(Engine, "connect", on_connect)
    _RELAXED = True


_RELAXED = False

#: what a folder optiflow creates holds as its .gitignore, as pytest's and mypy's caches do
GITIGNORE = "# Created by optiflow: runs and their outputs, not source. Delete this file to commit them.\n*\n"


def created_folder(path: Path) -> Path:
    """``path``, created with its parents when missing; the topmost folder this creates gets a ``.gitignore``
    of ``*`` (``mlruns/``, ``compare/``), so runs and outputs stay out of git unless the user says otherwise.
    A folder that exists is left as it is.  Raises OSError when it cannot be created."""
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    path.mkdir(parents=True, exist_ok=True)
    if missing:
        with contextlib.suppress(OSError):
            (missing[-1] / ".gitignore").write_text(GITIGNORE)
    return path


# A tracking server that stops answering stops the command in about a minute, not MLflow's default
# 7 retries with exponential backoff (minutes); the user's own settings of these variables win.
SERVER_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def fail_fast_http() -> Iterator[None]:
    """No retries and a short timeout while probing a tracking server, so a wrong URI fails in seconds."""
    saved = {name: os.environ.get(name) for name in PROBE_ENV}
    os.environ.update(PROBE_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def store_failure(exc: BaseException) -> str:
    """The root cause of a failed store call, e.g. ``Connection refused``."""
    text = str(exc)
    cause = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    return cause.group(1).strip() if cause else re.sub(r"^\([\w.]+\)\s*", "", first_line(exc))


_CLIENTS: dict[tuple[str, int], MlflowClient] = {}


def client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` on ``uri``; the first use of a SQLite store creates it under a file lock.

    One client per store and process, probed once: a search opens a run per trial and fold."""
    key = (uri, os.getpid())
    if key not in _CLIENTS:
        _CLIENTS[key] = _new_client(uri)
    return _CLIENTS[key]


def _new_client(uri: str) -> MlflowClient:
    import logging

    from mlflow.tracking import MlflowClient

    # MLflow logs each SQLAlchemy error with its traceback before raising it; optiflow says it in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    path = sqlite_path(uri)
    if is_server(uri):
        for name, value in SERVER_ENV.items():
            os.environ.setdefault(name, value)
    if path is not None:
        commit_without_waiting_for_the_disk()
    with store_lock(path):
        try:
            if path is not None:
                _create_whole(path)
            mlflow_client = MlflowClient(tracking_uri=uri)
            with fail_fast_http():
                mlflow_client.search_experiments(max_results=1)
        except Exception as exc:
            full = disk_full(exc, None, (), store=uri)
            if full is not None:
                raise full from None
            raise OptiflowError(_half_made(path, exc) or
                                f"cannot reach the tracking store {redact(uri)}: {store_failure(exc)}") from None
        if path is not None and use_write_ahead_log(path):
            # a new store: the connections MLflow opened to create it commit waiting for the disk; new ones do not
            mlflow_client._tracking_client.store.engine.dispose()
    return mlflow_client


def _create_whole(path: Path) -> None:
    """Create a new SQLite store whole or not at all (called under its lock): MLflow creates and migrates its
    tables in a hidden file beside it (seconds, dozens of migrations), which is renamed into place once done.
    Ctrl-C, SIGTERM or SIGKILL meanwhile leave no half-made store, only that file, removed on the way out or
    by the next creation (a creator's pid in its name; under the lock no other creation is running)."""
    import glob
    import sqlite3

    from mlflow.tracking import MlflowClient

    if str(path) == ":memory:":
        return
    for stale in glob.glob(glob.escape(str(path.with_name(f".{path.name}."))) + "*.creating*"):
        Path(stale).unlink(missing_ok=True)
    if path.exists():
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}.creating")
    try:
        creating = MlflowClient(tracking_uri=f"sqlite:///{partial}")
        creating.search_experiments(max_results=1)
        creating._tracking_client.store.engine.dispose()
        with contextlib.closing(sqlite3.connect(partial)) as connection:  # the last connection: no -wal left
            connection.execute("PRAGMA journal_mode=WAL")
        os.replace(partial, path)
    finally:
        for leftover in ("", "-journal", "-wal", "-shm"):
            Path(f"{partial}{leftover}").unlink(missing_ok=True)


#: what MLflow says when a store's tables were left half-made (a creation or migration stopped midway)
HALF_MADE = re.compile(r"_alembic_tmp_\w+ already exists|duplicate column name|table \w+ already exists")


def _half_made(path: Path | None, exc: BaseException) -> str | None:
    """One line for a SQLite store whose creation or migration was stopped midway (by optiflow 0.1,
    a SIGKILL, ``mlflow db upgrade`` interrupted): MLflow cannot resume it.  None for other failures."""
    import sqlite3

    if path is None or not HALF_MADE.search(str(exc)):
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
            runs = connection.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.Error:
        runs = 0
    if not runs:
        return (f"the tracking store {path} was left half-created by an interrupted command and holds no runs; "
                f"delete it (and {path.name}-wal, {path.name}-shm beside it) and run again")
    return (f"the tracking store {path} was left half-migrated by an interrupted upgrade ({store_failure(exc)}); "
            f"its {runs} runs are there but MLflow cannot resume: restore it from a backup")
