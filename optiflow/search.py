"""``optiflow search``: hyper-parameter search on Optuna, one parent MLflow run per study, a child per trial.

Several processes (``--n-jobs`` or separate ``optiflow search`` commands on one
``--storage``) share one study and one parent run: the first process to create
the study's lock study (a unique name, so exactly one succeeds) creates the
parent run and records its id in the study's user attributes; the others wait
for it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import multiprocessing
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import yaml

from optiflow.config import ComponentSpec, RunConfig, load_yaml, split_variants
from optiflow.errors import OptiflowError, RunKilled, TrainingError
from optiflow.experiment import csv_text, final_metrics, higher_is_better, markdown_table, number

SAMPLERS = ("grid", "random", "tpe", "gp", "cmaes", "nsga2")
PRUNERS = ("none", "median", "hyperband", "successive-halving")
FIELD_KINDS = {"data": "dataset", "norm": "normalizer", "model": "model", "loss": "loss", "opt": "optimizer",
               "sched": "scheduler", "init": "initializer", "reg": "regularizer"}
NOT_SEARCHABLE = frozenset({"experiment", "tracking_uri", "run_name", "cv_folds", "cv_fold"})
PARENT_ATTR = "optiflow.mlflow_parent_run_id"
LOCK_SUFFIX = ".optiflow-parent-lock"
PARENT_WAIT_SECONDS = 120.0
STORAGE_ATTEMPTS = 4


class TrialPruned(RunKilled, optuna.TrialPruned):
    """Optuna prunes the trial; the runner ends its MLflow run KILLED."""


class UnknownMetric(OptiflowError):
    """The objective metric is not among those the runs log: stops the study rather than failing each trial."""


@dataclass(frozen=True)
class Dimension:
    """One searched hyper-parameter: its name, what it sets and the range Optuna samples from."""

    name: str
    key: str
    option: str | None = None
    reg: str | None = None
    kind: str = "float"
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list[Any]:
        """The values the grid sampler visits: choices, or a range with a step."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.kind == "float" and self.step and not self.log:
            count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
            return [round(self.low + i * self.step, 12) for i in range(count)]
        raise OptiflowError(f"the grid sampler needs finite values: give '{self.name}' a step "
                            f"(float:LOW:HIGH:STEP) or list them (choice:A,B,...)")


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
    cv: int = 0
    storage: str | None = None
    study_name: str | None = None
    n_jobs: int = 1
    log_models: bool = False


@dataclass
class SearchResult:
    study_name: str
    parent_run_id: str
    best_value: float | None
    best_params: dict[str, Any]
    columns: list[str]
    rows: list[list[str]]
    counts: dict[str, int]


def parse_space(items: Any, base: RunConfig) -> list[Dimension]:
    """``lr=loguniform:1e-4:1e-1``, ``opt=choice:sgd,adam``, ``hidden=int:32:256`` (or a YAML file of
    such entries, or a mapping) as dimensions resolved against the base configuration."""
    entries: dict[str, Any] = {}
    for item in items if isinstance(items, (list, tuple)) else [items]:
        if isinstance(item, dict):
            entries.update(item)
            continue
        name, sep, spec = str(item).partition("=")
        if not sep and Path(name).suffix in {".yaml", ".yml"}:
            entries.update(load_yaml(name))
        elif not sep or not name.strip() or not spec.strip():
            raise OptiflowError(f"--space expects NAME=SPEC (e.g. lr=loguniform:1e-4:1e-1) or a YAML file, got '{item}'")
        else:
            entries[name.strip()] = spec.strip()
    if not entries:
        raise OptiflowError("nothing to search: give at least one --space NAME=SPEC (e.g. lr=loguniform:1e-4:1e-1)")
    ranges = {str(name): _parse_range(str(name), spec) for name, spec in entries.items()}
    chosen = {name.replace("-", "_"): dim.choices for name, dim in ranges.items() if dim.kind == "choice"}
    return [dataclasses.replace(dim, **_target(name, base, chosen)) for name, dim in ranges.items()]


def _parse_range(name: str, spec: Any) -> Dimension:
    if isinstance(spec, list):
        return Dimension(name, name, kind="choice", choices=tuple(_scalar(v) for v in spec))
    if isinstance(spec, dict):
        spec = dict(spec)
        kind = str(spec.pop("type", "choice" if "choices" in spec else "float"))
        if kind == "choice":
            return Dimension(name, name, kind="choice", choices=tuple(_scalar(v) for v in spec.get("choices", [])))
        spec = ":".join([kind, str(spec.get("low")), str(spec.get("high"))]
                        + (["log"] if spec.get("log") else []) + ([str(spec["step"])] if spec.get("step") else []))
    kind, _, rest = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind == "choice":
        choices = tuple(_scalar(v) for v in split_variants(rest))
        if len(set(choices)) < len(choices):
            raise OptiflowError(f"--space {name}: a choice is listed twice in '{spec}'")
        return Dimension(name, name, kind="choice", choices=choices)
    kinds = {"loguniform": ("float", True), "uniform": ("float", False), "float": ("float", False),
             "int": ("int", False), "logint": ("int", True)}
    if kind not in kinds:
        raise OptiflowError(f"--space {name}: unknown range '{kind}'; use loguniform, uniform, float, int, "
                            f"logint or choice (e.g. {name}=loguniform:1e-4:1e-1)")
    number_kind, log = kinds[kind]
    parts = [p.strip() for p in rest.split(":") if p.strip()]
    if "log" in parts:
        parts.remove("log")
        log = True
    try:
        low, high = float(parts[0]), float(parts[1])
        step = float(parts[2]) if len(parts) > 2 else None
        if len(parts) > 3:
            raise ValueError
    except (IndexError, ValueError):
        raise OptiflowError(f"--space {name}: write {kind}:LOW:HIGH[:STEP], got '{spec}'") from None
    if number_kind == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise OptiflowError(f"--space {name}: int bounds must be whole numbers, got '{spec}'")
    if not low < high:
        raise OptiflowError(f"--space {name}: LOW must be below HIGH, got '{spec}'")
    if log and low <= 0:
        raise OptiflowError(f"--space {name}: a log range needs LOW > 0, got '{spec}'")
    if step is not None and (step <= 0 or log):
        raise OptiflowError(f"--space {name}: a step must be > 0 and cannot be combined with log, got '{spec}'")
    return Dimension(name, name, kind=number_kind, low=low, high=high, log=log, step=step)


def _scalar(value: Any) -> Any:
    """A choice or option as Optuna stores it: numbers and booleans typed, everything else a string."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    text = str(value).strip()
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _target(name: str, base: RunConfig, chosen: dict[str, tuple]) -> dict[str, Any]:
    """What a space name sets: a configuration key (``lr``), a component option (``opt.momentum``,
    ``reg.l2.strength``) or an option name unique among the candidate components (``hidden``)."""
    from optiflow.plugins import get_registry

    registry = get_registry()
    key = name.replace("-", "_")
    fields = [f.name for f in dataclasses.fields(RunConfig) if f.name not in NOT_SEARCHABLE]
    if key in fields:
        return {"key": key}

    def candidates(field_name: str) -> list[tuple[str | None, Any]]:
        if field_name == "reg":
            return [(spec.name, registry.get("regularizer", spec.name)) for spec in base.reg]
        names = chosen.get(field_name) or [getattr(base, field_name) or None]
        specs = [ComponentSpec.parse(str(n)) for n in names if n is not None and str(n) != "None"]
        return [(None, registry.get(FIELD_KINDS[field_name], spec.name)) for spec in specs]

    def offers(component: Any, option: str) -> bool:
        return option in {o.name for o in component.options}

    head, _, option = key.partition(".")
    if option:
        if head not in FIELD_KINDS:
            raise OptiflowError(f"--space {name}: '{head}' is not a component; use one of {', '.join(FIELD_KINDS)}")
        reg = None
        if head == "reg":
            reg, _, option = option.partition(".")
            if reg not in {spec.name for spec in base.reg}:
                raise OptiflowError(f"--space {name}: regularizer '{reg}' is not in the run; add --reg {reg}")
        found = [c for r, c in candidates(head) if (reg is None or r == reg) and offers(c, option)]
        if not found:
            raise OptiflowError(f"--space {name}: no {head} in this search has an option '{option}'")
        return {"key": head, "option": option, "reg": reg}
    owners = [(f, r) for f in FIELD_KINDS for r, c in candidates(f) if offers(c, key)]
    if not owners:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise OptiflowError(f"--space {name}: not a setting or an option of the run's components{hint}")
    if len({f for f, _ in owners}) > 1:
        raise OptiflowError(f"--space {name}: ambiguous, write one of {', '.join(sorted({f'{f}.{key}' for f, _ in owners}))}")
    (owner, reg), *_ = owners
    return {"key": owner, "option": key, "reg": reg if owner == "reg" else None}


def trial_config(base: RunConfig, space: list[Dimension], sample: Callable[[Dimension], Any]) -> tuple[RunConfig, dict[str, Any]]:
    """The configuration of one trial: settings first, then the options of the components chosen."""
    from optiflow.plugins import get_registry

    registry = get_registry()
    values = base.to_dict()
    sampled: dict[str, Any] = {}
    for dim in (d for d in space if d.option is None):
        sampled[dim.name] = values[dim.key] = sample(dim)
    for dim in (d for d in space if d.option is not None):
        if dim.key == "reg":
            specs = [ComponentSpec.parse(s) for s in values["reg"]]
            index = next(i for i, spec in enumerate(specs) if spec.name == dim.reg)
            spec = specs[index]
        else:
            spec = ComponentSpec.parse(values[dim.key])
        component = registry.get(FIELD_KINDS[dim.key], spec.name)
        if dim.option not in {o.name for o in component.options}:
            continue
        sampled[dim.name] = sample(dim)
        spec = ComponentSpec(spec.name, {**spec.options, dim.option: sampled[dim.name]})
        if dim.key == "reg":
            specs[index] = spec
            values["reg"] = [str(s) for s in specs]
        else:
            values[dim.key] = str(spec)
    return RunConfig.from_dict(values), sampled


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


def _construct(what: str, name: str, factory: Callable[..., Any], *args: Any, **options: Any) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return factory(*args, **options)
    except TypeError as exc:
        raise OptiflowError(f"{what} '{name}': {exc}".replace("__init__() ", "")) from None
    except ValueError as exc:
        raise OptiflowError(f"{what} '{name}': {str(exc).splitlines()[0]}") from None
    except ImportError as exc:
        raise OptiflowError(f"{what} '{name}' needs the package '{exc.name}': pip install {exc.name}") from None


def parse_component(value: str, names: tuple[str, ...], what: str) -> tuple[str, dict[str, Any]]:
    """``tpe:n_startup_trials=5`` as ``("tpe", {"n_startup_trials": 5})`` with the choices checked."""
    spec = ComponentSpec.parse(value)
    if spec.name not in names:
        close = difflib.get_close_matches(spec.name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise OptiflowError(f"unknown {what} '{spec.name}'{hint}; choose from {', '.join(names)}")
    return spec.name, {k.replace("-", "_"): _scalar(v) for k, v in spec.options.items()}


def open_storage(url: str | None) -> Any:
    """An Optuna storage from ``--storage``: ``sqlite:///x.db``, ``postgresql://...``, a journal file
    (``journal:PATH`` or a path ending in .log/.journal), or in-memory when ``None``."""
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
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as exc:  # SQLAlchemy raises many kinds; a process creating the schema beside us is one
            failure = str(exc).splitlines()[0]
            time.sleep(0.5 * (attempt + 1))
    raise OptiflowError(f"cannot open the study storage {_redact(url)}: {failure}")


def validate(base: RunConfig, settings: SearchSettings) -> None:
    """Check the space, sampler and pruner, and that every choice builds a run, before anything runs."""
    from optiflow.plugins import get_registry
    from optiflow.runner import plan

    if settings.n_trials is not None and settings.n_trials < 1:
        raise OptiflowError(f"--n-trials must be >= 1, got {settings.n_trials}")
    if settings.n_jobs < 1:
        raise OptiflowError(f"--n-jobs must be >= 1, got {settings.n_jobs}")
    if settings.cv == 1 or settings.cv < 0:
        raise OptiflowError(f"--cv needs at least 2 folds, got {settings.cv}")
    if settings.direction not in ("minimize", "maximize"):
        raise OptiflowError(f"--direction must be minimize or maximize, got '{settings.direction}'")
    if settings.cv and not settings.metric.startswith("val_"):
        raise OptiflowError(f"with --cv the objective is a validation metric (val_loss, val_accuracy ...), "
                            f"not '{settings.metric}'")
    make_sampler(settings)
    make_pruner(settings, base.epochs)
    registry = get_registry()
    for dim in settings.space:
        for value in (dim.choices if dim.kind == "choice" else (dim.low, dim.high)):
            def pick(d: Dimension, dim: Dimension = dim, value: Any = value) -> Any:
                if d is dim:
                    return int(value) if d.kind == "int" else value
                return d.choices[0] if d.kind == "choice" else (int(d.low) if d.kind == "int" else d.low)

            try:
                plan(trial_config(base, settings.space, pick)[0], registry)
            except OptiflowError as exc:
                raise OptiflowError(f"--space {dim.name}={value}: {exc}") from None


def search(base: RunConfig, settings: SearchSettings, *, tags: dict[str, str] | None = None,
           progress: Callable[[str], Any] | None = None) -> SearchResult:
    """Run (or join) the study and map it onto MLflow; returns the study's summary."""
    from optiflow.tracking import Tracker

    validate(base, settings)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    temporary = None
    if settings.n_jobs > 1 and settings.storage is None:
        temporary = tempfile.TemporaryDirectory(prefix="optiflow-study-")
        settings = dataclasses.replace(settings, storage=f"journal:{temporary.name}/study.log")
    try:
        study = _open_study(base, settings)
        tracker = Tracker(base.tracking_uri, base.experiment)
        parent_id = shared_parent_run(study, settings.storage is not None,
                                      lambda: _create_parent(tracker, base, settings, study.study_name, tags))
        tracker.start(run_id=parent_id)
        status = "FAILED"
        workers: list[Any] = []
        try:
            workers = _spawn_workers(base, settings, study.study_name, parent_id, tags)
            share = _share(settings.n_trials, settings.n_jobs, 0)
            run_trials(base, settings, study, parent_id, share, tags=tags, progress=progress)
            for worker in workers:
                worker.join()
            if any(worker.exitcode != 0 for worker in workers):
                raise OptiflowError("a search worker process failed; see the failed trials in the study")
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
            result = summarize(tracker, study, settings)
            still_running = any(t.state == optuna.trial.TrialState.RUNNING for t in study.get_trials(deepcopy=False))
            if status != "FINISHED" or not still_running:
                tracker.end(status)
        return result
    finally:
        if temporary is not None:
            temporary.cleanup()


def _open_study(base: RunConfig, settings: SearchSettings) -> optuna.Study:
    storage = open_storage(settings.storage)
    steps = base.epochs * max(settings.cv, 1)
    try:
        study = optuna.create_study(storage=storage, study_name=settings.study_name, load_if_exists=True,
                                    sampler=make_sampler(settings), pruner=make_pruner(settings, steps),
                                    direction=settings.direction)
    except ValueError as exc:
        raise OptiflowError(f"study '{settings.study_name}': {str(exc).splitlines()[0]}") from None
    if study.direction.name.lower() != settings.direction:
        raise OptiflowError(f"study '{study.study_name}' was created to {study.direction.name.lower()}, "
                            f"not {settings.direction}")
    return study


def shared_parent_run(study: optuna.Study, shared: bool, create: Callable[[], str]) -> str:
    """The study's parent MLflow run: created by exactly one process, found by every other.

    The process that manages to create the lock study ``<study>.optiflow-parent-lock``
    (study names are unique in every Optuna storage) creates the run and stores its id
    in the study's user attributes; the others poll for that attribute.
    """
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id:
        return run_id
    if not shared:
        run_id = create()
        study.set_user_attr(PARENT_ATTR, run_id)
        return run_id
    lock_name = study.study_name + LOCK_SUFFIX
    try:
        optuna.create_study(storage=study._storage, study_name=lock_name)
    except optuna.exceptions.DuplicatedStudyError:
        deadline = time.monotonic() + PARENT_WAIT_SECONDS
        while time.monotonic() < deadline:
            run_id = study.user_attrs.get(PARENT_ATTR)
            if run_id:
                return run_id
            time.sleep(0.2)
        raise OptiflowError(f"another process is setting up study '{study.study_name}' but recorded no MLflow "
                            f"run; if it crashed, delete the study '{lock_name}'") from None
    try:
        run_id = create()
    except BaseException:
        optuna.delete_study(study_name=lock_name, storage=study._storage)
        raise
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def _create_parent(tracker: Any, base: RunConfig, settings: SearchSettings, study_name: str,
                   tags: dict[str, str] | None) -> str:
    run_id = tracker.start(run_name=base.run_name or f"search {study_name}",
                           tags={**(tags or {}), "optiflow.kind": "search", "optuna.study_name": study_name})
    params = {"study_name": study_name, "sampler": settings.sampler, "pruner": settings.pruner,
              "metric": settings.metric, "direction": settings.direction, "cv": settings.cv,
              "storage": _redact(settings.storage) if settings.storage else "in-memory"}
    params.update({f"space.{d.name}": describe_dimension(d) for d in settings.space})
    params.update({f"sampler.{k}": v for k, v in settings.sampler_options.items()})
    params.update({f"pruner.{k}": v for k, v in settings.pruner_options.items()})
    tracker.log_params(params)
    tracker.log_text(base.to_yaml(), "config.yaml")
    tracker.log_text(yaml.safe_dump({d.name: describe_dimension(d) for d in settings.space}, sort_keys=False), "space.yaml")
    return run_id


def describe_dimension(dim: Dimension) -> str:
    if dim.kind == "choice":
        return "choice:" + "|".join(map(str, dim.choices))
    kind = {("float", True): "loguniform", ("float", False): "float", ("int", True): "logint", ("int", False): "int"}
    low, high = (int(dim.low), int(dim.high)) if dim.kind == "int" else (dim.low, dim.high)
    return f"{kind[(dim.kind, dim.log)]}:{low}:{high}" + (f":{dim.step:g}" if dim.step else "")


def _redact(url: str) -> str:
    """A storage URL without its password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':')[0]}:***@{host}"


def _share(n_trials: int, n_jobs: int, index: int) -> int:
    return n_trials // n_jobs + (index < n_trials % n_jobs)


def _spawn_workers(base: RunConfig, settings: SearchSettings, study_name: str, parent_id: str,
                   tags: dict[str, str] | None) -> list[Any]:
    """``n_jobs - 1`` extra processes (separate processes, so per-run plugins never cross runs)."""
    context = multiprocessing.get_context("spawn")
    workers = []
    for index in range(1, settings.n_jobs):
        share = _share(settings.n_trials, settings.n_jobs, index)
        if share:
            worker = context.Process(target=_worker, args=(base, settings, study_name, parent_id, share, tags),
                                     daemon=True)
            worker.start()
            workers.append(worker)
    return workers


def _worker(base: RunConfig, settings: SearchSettings, study_name: str, parent_id: str, n_trials: int,
            tags: dict[str, str] | None) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = _open_study(base, dataclasses.replace(settings, study_name=study_name))
    run_trials(base, settings, study, parent_id, n_trials, tags=tags)


def run_trials(base: RunConfig, settings: SearchSettings, study: optuna.Study, parent_id: str, n_trials: int,
               *, tags: dict[str, str] | None = None, progress: Callable[[str], Any] | None = None) -> None:
    """Optimize ``n_trials`` trials of ``study`` in this process, each a child run of ``parent_id``."""

    def objective(trial: optuna.Trial) -> float:
        config, sampled = trial_config(base, settings.space, lambda dim: dim.suggest(trial))
        trial_tags = {**(tags or {}), "optuna.study_name": study.study_name, "optuna.trial_number": str(trial.number)}
        params = {"optuna.trial_number": trial.number, "optuna.sampler": settings.sampler,
                  "optuna.pruner": settings.pruner, **{f"trial.{k}": v for k, v in sampled.items()}}
        name = f"trial {trial.number}"
        try:
            if settings.cv:
                value = _cross_validate(trial, config, settings, parent_id, name, trial_tags, params)
            else:
                result = _train_trial(trial, config.replace(run_name=name), settings, parent_id, trial_tags,
                                      params, offset=0)
                trial.set_user_attr("mlflow_run_id", result.run_id)
                value = _objective_value(final_metrics(result.metrics, result.history), settings.metric)
        except TrialPruned:
            trial.set_user_attr("mlflow_run_id", _child_run(base, parent_id, name, trial_tags, params, None))
            raise
        except UnknownMetric:
            raise
        except OptiflowError as exc:
            trial.set_user_attr("failure", str(exc)[:1000])
            trial.set_user_attr("mlflow_run_id", _child_run(base, parent_id, name, trial_tags, params, str(exc)))
            raise exc if isinstance(exc, TrainingError) else TrainingError(str(exc)) from None
        return value

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if progress is None:
            return
        shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        value = f"{settings.metric}={trial.value:.4g}" if trial.value is not None else trial.user_attrs.get("failure", "")
        try:
            best = f"  (best {study.best_value:.4g})"
        except ValueError:
            best = ""
        progress(f"trial {trial.number} {trial.state.name.lower()}: {value}{best}  {shown}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(objective, n_trials=n_trials, timeout=settings.timeout, catch=(TrainingError,),
                       callbacks=[report], gc_after_trial=False)


def _train_trial(trial: optuna.Trial, config: RunConfig, settings: SearchSettings, parent_id: str,
                 tags: dict[str, str], params: dict[str, Any], offset: int) -> Any:
    """One training reporting its per-epoch metric to the pruner (step ``offset + epoch``)."""
    from optiflow.runner import train

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        value = metrics.get(settings.metric)
        if value is None or settings.pruner == "none":
            return
        trial.report(value, offset + epoch)
        if trial.should_prune():
            raise TrialPruned(f"pruned by optuna ({settings.pruner}) after epoch {epoch}: "
                              f"{settings.metric}={value:.4g}")

    return train(config, parent_run_id=parent_id, extra_tags=tags, extra_params=params, on_epoch=on_epoch,
                 log_model=settings.log_models)


def _cross_validate(trial: optuna.Trial, config: RunConfig, settings: SearchSettings, parent_id: str, name: str,
                    tags: dict[str, str], params: dict[str, Any]) -> float:
    """K trainings, fold k validating on fold k of the training split; the trial's run holds the folds."""
    from optiflow.tracking import Tracker

    tracker = Tracker(config.tracking_uri, config.experiment)
    tracker.start(run_name=name, tags={**tags, "optiflow.kind": "cross-validation"}, parent_run_id=parent_id)
    trial.set_user_attr("mlflow_run_id", tracker.run_id)
    status = "FAILED"
    scores: list[float] = []
    histories: list[dict[str, list[float]]] = []
    try:
        tracker.log_params({**params, "cv_folds": settings.cv})
        tracker.log_text(config.to_yaml(), "config.yaml")
        for fold in range(settings.cv):
            fold_config = config.replace(cv_folds=settings.cv, cv_fold=fold, run_name=f"{name} fold {fold}")
            result = _train_trial(trial, fold_config, settings, tracker.run_id, {**tags, "optiflow.cv_fold": str(fold)},
                                  {"optuna.trial_number": trial.number}, offset=fold * config.epochs)
            scores.append(_objective_value(final_metrics(result.metrics, result.history), settings.metric))
            histories.append(result.history)
            tracker.log_metrics({f"cv_{settings.metric}": scores[-1]}, step=fold + 1)
        for epoch in range(min(len(h.get("train_loss", [])) for h in histories)):
            keys = set.intersection(*(set(h) for h in histories))
            tracker.log_metrics({k: statistics.fmean(h[k][epoch] for h in histories) for k in keys}, step=epoch + 1,
                                flush=False)
        value = statistics.fmean(scores)
        tracker.log_metrics({f"cv_{settings.metric}_mean": value,
                             f"cv_{settings.metric}_std": statistics.pstdev(scores)})
        status = "FINISHED"
        return value
    except (TrialPruned, KeyboardInterrupt):
        status = "KILLED"
        raise
    except Exception as exc:
        tracker.set_tags({"failure": f"{exc}"[:5000]})
        raise
    finally:
        tracker.end(status)


def _objective_value(metrics: dict[str, float], metric: str) -> float:
    if metric not in metrics:
        raise UnknownMetric(f"the runs produce no metric '{metric}'; available: {', '.join(sorted(metrics))}")
    return metrics[metric]


def _child_run(base: RunConfig, parent_id: str, name: str, tags: dict[str, str], params: dict[str, Any],
               failure: str | None) -> str:
    """The id of a trial's child run; a trial that failed before its run started gets a FAILED one saying why."""
    from optiflow.tracking import Tracker, retry

    tracker = Tracker(base.tracking_uri, base.experiment)
    query = (f"tags.mlflow.parentRunId = '{parent_id}' and "
             f"tags.`optuna.trial_number` = '{tags['optuna.trial_number']}'")
    found = retry(tracker.client.search_runs, [tracker.experiment_id], query, max_results=1)
    if found or failure is None:
        return found[0].info.run_id if found else "-"
    run_id = tracker.start(run_name=name, tags={**tags, "failure": failure[:5000]}, parent_run_id=parent_id)
    tracker.log_params(params)
    tracker.end("FAILED")
    return run_id


def summarize(tracker: Any, study: optuna.Study, settings: SearchSettings) -> SearchResult:
    """Best value and parameters, trial counts, the trials table and Optuna's plots on the parent run."""
    from optiflow.plots import _pyplot

    trials = study.get_trials(deepcopy=False)
    counts = {state.name: sum(t.state == state for t in trials) for state in optuna.trial.TrialState}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial if complete else None
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    columns = ["trial", "state", settings.metric, *names, "mlflow run"]
    ordered = sorted(trials, key=lambda t: (t.value is None, (t.value or 0) * (1 if settings.direction == "minimize" else -1)))
    rows = [[str(t.number), t.state.name, number(t.value), *(_short(t.params.get(n, "-")) for n in names),
             str(t.user_attrs.get("mlflow_run_id", "-"))] for t in ordered]
    tracker.log_metrics({"n_trials": len(trials), **{f"n_{k.lower()}": v for k, v in counts.items() if v}},
                        step=len(trials))
    tracker.log_text(csv_text(columns, rows), "trials.csv")
    tracker.log_text(markdown_table(columns, rows), "trials.md")
    if best is not None:
        tracker.log_metrics({"best_value": best.value}, step=len(trials))
        tracker.set_tags({"best_trial": best.number, "best_run_id": best.user_attrs.get("mlflow_run_id", "-"),
                          **{f"best.{k}": v for k, v in best.params.items()}})
        tracker.log_text(yaml.safe_dump({"value": best.value, "metric": settings.metric, "trial": best.number,
                                         "params": best.params}, sort_keys=False), "best_params.yaml")
        plt = _pyplot()
        plots = [("optimization_history.png", optuna.visualization.matplotlib.plot_optimization_history)]
        if len(complete) > 1 and names:
            plots.append(("param_importances.png", optuna.visualization.matplotlib.plot_param_importances))
        if settings.pruner != "none":
            plots.append(("intermediate_values.png", optuna.visualization.matplotlib.plot_intermediate_values))
        for artifact, plot in plots:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                tracker.set_tags({f"plot.{artifact}": f"not drawn: {exc}"[:500]})
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            tracker.log_figure(figure, artifact)
            plt.close(figure)
    return SearchResult(study.study_name, tracker.run_id, best.value if best else None,
                        dict(best.params) if best else {}, columns, rows, counts)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def default_direction(metric: str) -> str:
    return "maximize" if higher_is_better(metric) else "minimize"


def settings_from(values: dict[str, Any], base: RunConfig) -> SearchSettings:
    """Search settings from flags and ``--config`` values, validated and with defaults filled in."""
    space = parse_space(values.get("space") or (), base)
    sampler, sampler_options = parse_component(str(values.get("sampler") or "tpe"), SAMPLERS, "sampler")
    pruner, pruner_options = parse_component(str(values.get("pruner") or "none"), PRUNERS, "pruner")
    metric = str(values.get("metric") or "val_loss")
    n_trials = values.get("n_trials")
    if n_trials is None and sampler == "grid":
        n_trials = math.prod(len(dim.grid()) for dim in space)
    cv = int(values.get("cv") or 0)
    return SearchSettings(
        space=space, sampler=sampler, sampler_options=sampler_options, sampler_seed=values.get("sampler_seed"),
        pruner=pruner, pruner_options=pruner_options, metric=metric,
        direction=str(values.get("direction") or default_direction(metric)), n_trials=int(n_trials or 20),
        timeout=values.get("timeout"), cv=cv, storage=values.get("storage"), study_name=values.get("study_name"),
        n_jobs=int(values.get("n_jobs") or 1), log_models=bool(values.get("log_models")),
    )
