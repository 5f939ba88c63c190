"""The Optuna study: its settings, sampler, pruner and storage, and the one parent MLflow run it shares.

Several processes (``--n-jobs`` or separate ``optiflow search`` commands on one
``--storage``) share one study and one parent run: the first process to create
the study's ``parent-run`` claim (:mod:`optiflow.search.claims`: exactly one
succeeds) creates the parent run and records its id in the study's user
attributes; the others wait for it, and take the claim over when its holder is gone.
"""

from __future__ import annotations

import difflib
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import optuna

from optiflow.config import ComponentSpec, RunConfig, brief
from optiflow.errors import OptiflowError, first_line, redact
from optiflow.registry import annotation_of
from optiflow.search.space import Dimension
from optiflow.search.workers import HEARTBEAT_SECONDS, PARENT_ATTR, heartbeat_options
from optiflow.values import coerce, key_name, literal, type_name

SAMPLERS = ("grid", "random", "tpe", "gp", "cmaes", "nsga2")
PRUNERS = ("none", "median", "hyperband", "successive-halving")
#: what a sampler or pruner constructor makes
Made = TypeVar("Made")
PARENT_CLAIM = "parent-run"
PARENT_WAIT_SECONDS = 120.0
STORAGE_ATTEMPTS = 4


@dataclass
class SearchSettings:
    """Everything about the study besides the base run configuration."""

    space: list[Dimension]
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    sampler_seed: int | None = None
    pruner: str = "none"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    metric: str = "val_loss"
    direction: str = "minimize"
    n_trials: int = 20
    timeout: float | None = None
    #: a value of the objective (``metric``) that ends the study once a finished trial reaches it
    target: float | None = None
    #: seconds of wall time for the whole search (``--budget 30m``), from the command's start
    budget: float | None = None
    #: when the budget ends, wall-clock seconds (``time.time()``): set as the search starts, shared with its workers
    deadline: float | None = None
    cv: int = 0
    storage: str | None = None
    study_name: str | None = None
    n_jobs: int = 1
    log_models: bool = False
    #: child runs (trials, folds) log figures and files too, not only params and metrics
    child_artifacts: bool = False
    refit: bool = True
    register: str | None = None
    #: seconds between trial heartbeats on RDB storages (0: none); a trial silent for twice that is retried
    heartbeat: int = HEARTBEAT_SECONDS
    #: a trial (a fold) whose run's content key a FINISHED run holds reuses that run instead of training
    reuse: bool = True


#: the settings a user gives by flag or in ``--config`` (the sampler's and pruner's options come with their names;
#: ``refit`` and ``register`` are flags of their own)
GIVEN = ("space", "sampler", "sampler_seed", "pruner", "metric", "direction", "n_trials", "timeout", "target", "budget",
         "cv", "storage", "study_name", "n_jobs", "log_models", "child_artifacts", "heartbeat")
#: settings whose default follows from others: the metric from --target, the direction from the metric, the trials
#: from a grid's size
DERIVED = ("metric", "direction", "n_trials")


def given_defaults() -> dict[str, Any]:
    """The default of every setting in :data:`GIVEN`, from :class:`SearchSettings`: None for the derived
    ones (:data:`DERIVED`), an empty space."""
    defaults = {f.name: f.default for f in fields(SearchSettings) if f.name in GIVEN}
    return {**defaults, "space": (), **dict.fromkeys(DERIVED)}


def make_sampler(settings: SearchSettings) -> optuna.samplers.BaseSampler:
    samplers: dict[str, Callable[..., Any]] = {
        "random": optuna.samplers.RandomSampler,
        "tpe": optuna.samplers.TPESampler,
        "gp": optuna.samplers.GPSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "nsga2": optuna.samplers.NSGAIISampler,
    }
    options = dict(settings.sampler_options)
    if settings.sampler == "grid":
        space = {dim.name: dim.grid() for dim in settings.space}
        return _construct("sampler", "grid", optuna.samplers.GridSampler, space, seed=settings.sampler_seed, **options)
    if settings.sampler == "nsga2":
        options.setdefault("population_size", max(2, min(50, settings.n_trials // 3)))
    if settings.sampler == "cmaes":
        options.setdefault("warn_independent_sampling", False)
    return _construct("sampler", settings.sampler, samplers[settings.sampler], seed=settings.sampler_seed, **options)


def make_pruner(settings: SearchSettings, steps: int) -> optuna.pruners.BasePruner:
    pruners: dict[str, Callable[..., Any]] = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "hyperband": lambda **o: optuna.pruners.HyperbandPruner(**{"min_resource": 1, "max_resource": steps, **o}),
        "successive-halving": lambda **o: optuna.pruners.SuccessiveHalvingPruner(**{"min_resource": 1, **o}),
    }
    return _construct("pruner", settings.pruner, pruners[settings.pruner], **settings.pruner_options)


def parse_component(value: str, names: tuple[str, ...], what: str) -> tuple[str, dict[str, Any]]:
    """``tpe:n_startup_trials=5`` as ``("tpe", {"n_startup_trials": 5})`` with the choices checked."""
    spec = ComponentSpec.parse(value)
    if spec.name not in names:
        close = difflib.get_close_matches(spec.name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise OptiflowError(f"unknown {what} '{spec.name}'{hint}; choose from {', '.join(names)}")
    return spec.name, {key_name(k): literal(v) for k, v in spec.options.items()}


def open_storage(url: str | None, heartbeat: int = 0,
                 tracking_uri: str | None = None) -> optuna.storages.BaseStorage | None:
    """An Optuna storage from ``--storage``: ``sqlite:///x.db``, ``postgresql://...``, a journal file
    (``journal:PATH`` or a path ending in .log/.journal), or in-memory when ``None``.

    RDB storages beat trial heartbeats every ``heartbeat`` seconds (see :mod:`optiflow.search.workers`;
    ``tracking_uri`` is where a dead trial's MLflow run is ended).  A PostgreSQL or MySQL server gets
    10 s to answer a connection, so a worker that loses it stops in bounded time.
    """
    if url is None:
        return None
    path = url[len("journal:"):] if url.startswith("journal:") else url
    if url.startswith("journal:") or ("://" not in url and Path(url).suffix in {".log", ".journal", ".jsonl"}):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(path))
        except OSError as exc:
            raise OptiflowError(f"cannot open the journal file {path}: {exc.strerror}") from None
    if "://" not in url:
        raise OptiflowError(f"--storage '{url}' is not a storage URL: use sqlite:///study.db, "
                            "postgresql://..., or journal:study.log")
    if url.startswith("sqlite"):
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    elif url.startswith(("postgresql", "mysql")):
        kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    else:
        kwargs = {}
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs,
                                                  **heartbeat_options(heartbeat, tracking_uri))
        except ImportError as exc:
            raise OptiflowError(f"the study storage {redact(url)} needs the package '{exc.name}': "
                                'pip install "optiflow[cluster]"') from None
        except Exception as exc:  # SQLAlchemy raises many kinds; a process creating the schema beside us is one
            failure = re.sub(r"^\([\w.]+\)\s*", "", first_line(exc))  # no "(sqlite3.DatabaseError)" prefix
            time.sleep(0.5 * (attempt + 1))
    raise OptiflowError(f"cannot open the study storage {redact(url)}: {failure}")


def open_study(base: RunConfig, settings: SearchSettings) -> optuna.Study:
    """Create the study, or load it from the storage with the same direction."""
    storage = open_storage(settings.storage, settings.heartbeat, base.tracking_uri)
    steps = base.epochs * max(settings.cv, 1)
    try:
        study = optuna.create_study(storage=storage, study_name=settings.study_name, load_if_exists=True,
                                    sampler=make_sampler(settings), pruner=make_pruner(settings, steps),
                                    direction=optuna.study.StudyDirection[settings.direction.upper()])
    except ValueError as exc:
        raise OptiflowError(f"study '{settings.study_name}': {first_line(exc)}") from None
    if study.direction.name.lower() != settings.direction:
        raise OptiflowError(f"study '{study.study_name}' was created to {study.direction.name.lower()}, "
                            f"not {settings.direction}")
    return study


def shared_parent_run(study: optuna.Study, shared: bool, create: Callable[[], str]) -> str:
    """The study's parent MLflow run: created by exactly one process, found by every other.

    The process that takes the study's claim ``parent-run`` (:func:`~optiflow.search.claims.claim`: exactly
    one does, and no study is created for it) creates the run and stores its id in the study's user
    attributes; the others poll for that attribute.
    """
    from optiflow.search.claims import claim, holder, release

    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id:
        return run_id
    if not shared:
        run_id = create()
        study.set_user_attr(PARENT_ATTR, run_id)
        return run_id
    deadline = time.monotonic() + PARENT_WAIT_SECONDS
    while not claim(study, PARENT_CLAIM):  # a holder that is gone is taken over (see optiflow.search.claims)
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id:
            return run_id
        if time.monotonic() > deadline:
            raise OptiflowError(f"another process ({holder(study, PARENT_CLAIM)}) is setting up study "
                                f"'{study.study_name}' but recorded no MLflow run in {PARENT_WAIT_SECONDS:.0f} s; "
                                "if it was killed, search under a new --study-name") from None
        time.sleep(0.2)
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id:  # the holder recorded the run just before this process took the claim over
        return run_id
    try:
        run_id = create()
    except BaseException:
        release(study, PARENT_CLAIM)
        raise
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def _construct(what: str, name: str, factory: Callable[..., Made], *args: object, **options: object) -> Made:
    options = _typed(what, name, factory, options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return factory(*args, **options)
    except TypeError as exc:
        raise OptiflowError(f"{what} '{name}': {exc}".replace("__init__() ", "")) from None
    except ValueError as exc:
        raise OptiflowError(f"{what} '{name}': {first_line(exc)}") from None
    except ImportError as exc:
        raise OptiflowError(f"{what} '{name}' needs the package '{exc.name}': pip install {exc.name}") from None


def _typed(what: str, name: str, factory: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """Options read as the type the constructor declares (or its default has): Optuna checks them only mid-study."""
    types = _option_types(factory)
    typed = dict(options)
    for key, value in options.items():
        if key not in types:
            continue
        try:
            typed[key] = coerce(types[key], value)
        except (TypeError, ValueError, OverflowError):
            raise OptiflowError(f"{what} '{name}': option '{key}' expects {type_name(types[key])}, "
                                f"got {brief(value)}") from None
    return typed


def _option_types(factory: Callable[..., Any]) -> dict[str, object]:
    """The parameters of ``factory`` declared (or defaulting to) bool, int, float or str, optionally None."""
    import inspect
    import typing

    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    scalars = {bool, int, float, str, type(None)}
    types: dict[str, object] = {}
    for key, parameter in parameters.items():
        hint = annotation_of(factory, parameter)
        if hint is inspect.Parameter.empty and parameter.default not in (None, inspect.Parameter.empty):
            hint = type(parameter.default)
        if hint is not type(None) and set(typing.get_args(hint) or (hint,)) <= scalars:
            types[key] = hint
    return types
