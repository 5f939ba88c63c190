"""The live state of one training run, and how it is built from a plan.

Everything a user can get wrong fails in :func:`prepare`, before an MLflow run exists.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from optiflow import digest, distributed
from optiflow.config import RunConfig
from optiflow.data import DataContext, DataSource, Normalizer, Splits, _remembered, normalize, split, value_range
from optiflow.errors import OptiflowError, first_line
from optiflow.optim import keep_decay_groups
from optiflow.plan import Plan, plan
from optiflow.registry import Component, Registry
from optiflow.runkey import run_key
from optiflow.runlog import RunTracker
from optiflow.schedule import Schedule, TrainingLength, rehearse, scheduled
from optiflow.setup import Setup, decide, resolve_device, use_fused_kernels

#: what a run is for (``Run.role``): a plain training, a variant of ``optiflow compare``, a search trial, a fold
#: of a cross-validated trial, or the refit of a search's best trial
ROLES = ("train", "compare-child", "search-trial", "cv-fold", "refit")


class Reporter(Protocol):
    """Progress display driven by the training loop (the CLI passes a rich one)."""

    def start(self, epochs: int, batches: int) -> None: ...

    def batch(self) -> None: ...

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def stop(self) -> None: ...


class SilentReporter:
    def start(self, epochs: int, batches: int) -> None: ...

    def batch(self) -> None: ...

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Run:
    """The live state of one training run; every lifecycle hook receives it."""

    config: RunConfig  #: the resolved configuration (every flag)
    plan: Plan  #: each slot's component with its typed options; ``plan.params()`` flattens them
    setup: Setup  #: where and how the run computes: device, amp_dtype, channels_last, streamed
    source: DataSource  #: the dataset (a run that loaded it alone keeps 5 raw samples: its data is ``splits``)
    splits: Splits  #: x/y of train, val and test, normalized, on the device
    model: nn.Module  #: the live model, on ``device``
    loss_fn: nn.Module  #: the loss the run trains with
    optimizer: torch.optim.Optimizer  #: the live optimizer (see the step contract in docs/plugins.md)
    schedule: Schedule  #: the learning-rate scheduler, its interval and monitored metric
    length: TrainingLength  #: epochs and steps per epoch
    #: draws the order of training batches; its state is checkpointed
    batch_generator: torch.Generator
    normalizer: Normalizer | None = None  #: the fitted normalizer (None for ``none``)
    #: the raw values seen in training, (lows, highs): one pair, or one per feature (:func:`~optiflow.data.value_range`)
    input_range: tuple[list[float], list[float]] | None = None
    augmentation: Callable[[Tensor], Tensor] | None = None  #: the augmentations as one per-sample function
    regularizers: list[Any] = field(default_factory=list)  #: the ``--reg`` objects, registered as plugins for the run
    #: the MLflow run's tracker, None until the run is open (``optiflow_check_run`` sees None)
    tracker: RunTracker | None = None
    #: the names every epoch's metrics will hold, the core's and those plugins declare
    #: (``optiflow_metric_names``); set before ``optiflow_check_run``, None before
    metric_names: frozenset[str] | None = None
    #: what the finished run's final metrics will hold: ``metric_names``, those plugins add at epoch end
    #: (``optiflow_epoch_metric_names``), the test split's and ``train_seconds``; None before ``optiflow_check_run``
    final_metric_names: frozenset[str] | None = None
    metrics_declared: bool = True  #: False when a third-party plugin adds metrics without declaring them
    epoch: int = 0  #: the current epoch, from 1 (0 before the first)
    step: int = 0  #: training batches so far, from 1, across epochs
    stop_reason: str | None = None  #: why training ends early (``request_stop``), else None
    history: dict[str, list[float]] = field(default_factory=dict)  #: every logged epoch metric so far, as lists
    last_outputs: Tensor | None = None  #: the current batch's outputs (``optiflow_penalty`` reads them)
    last_targets: Tensor | None = None  #: the current batch's targets, after ``optiflow_train_batch``
    checkpoint: dict[str, Any] | None = None  #: the last checkpoint taken (what ``--resume`` restores)
    status: str | None = None  #: FINISHED, FAILED or KILLED once training ended, else None
    #: per-run scratch space for plugins, keyed by plugin name
    state: dict[str, Any] = field(default_factory=dict)
    #: why the run trains, one of :data:`ROLES`: ``train`` (optiflow train, reproduce), ``compare-child``,
    #: ``search-trial``, ``cv-fold`` (a fold of a cross-validated trial) or ``refit`` (search's best trial refitted)
    role: str = "train"
    #: whether the run logs pictures and files (figures, config.yaml, a plugin's artifacts): false for search
    #: trials and folds unless ``--child-artifacts``; params, metrics and tags are logged either way
    wants_artifacts: bool = True
    #: the content key (:mod:`optiflow.runkey`): a FINISHED run holding it is reused instead of training this one
    key: str = ""

    @property
    def device(self) -> torch.device:
        """The device the run trains on (``setup.device``)."""
        return self.setup.device

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return self.source.task

    @property
    def lr(self) -> float:
        """The first parameter group's current learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def tracking(self) -> RunTracker:
        """``tracker`` once the MLflow run is open (the loop, the end of the run); an error before."""
        if self.tracker is None:
            raise OptiflowError("the run is not open yet: it has no tracker before optiflow_run_start")
        return self.tracker

    def request_stop(self, reason: str) -> None:
        """Ask the loop to end training after the current epoch."""
        self.stop_reason = self.stop_reason or reason

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log extra metrics on this run (batched with the epoch's own)."""
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.epoch if step is None else step, flush=False)

    def set_tags(self, tags: dict[str, object]) -> None:
        """Set MLflow tags on this run (nothing before it opens)."""
        if self.tracker is not None:
            self.tracker.set_tags(tags)


@dataclass
class RunResult:
    """What a finished training returns (a run that does not finish raises instead)."""

    run_id: str | None  #: the MLflow run's id
    metrics: dict[str, float]  #: the final test metrics
    history: dict[str, list[float]]  #: every epoch metric, as lists
    epochs: int  #: the epochs trained
    seconds: float  #: the training's wall time
    tracking_uri: str | None  #: the store the run is in
    stop_reason: str | None = None  #: why training stopped early, if it did
    resumed_from: int | None = None  #: the epoch a ``--resume`` went on from, else None
    #: the run was not trained: it is a FINISHED run of the same key (:func:`optiflow.reuse.finished_run`)
    reused: bool = False


def prepare(config: RunConfig, registry: Registry) -> Run:
    """Load and split the data, build the model, loss, optimizer and scheduler, and decide
    where and how they compute; raises OptiflowError on bad input."""
    resolved = plan(config, registry)
    cluster = distributed.current()
    device = resolve_device(config.device, cluster.local_rank if cluster.enabled else None)
    torch.manual_seed(config.seed)
    source = load_source(resolved, config)
    key = run_key(resolved, dataset_digest(source), device, cluster.world_size)
    splits = split(source, config.val_split, config.test_split, config.seed,
                   cv_folds=config.cv_folds, cv_fold=config.cv_fold)
    input_range = value_range(source, splits.x_train)
    norm, norm_options = resolved.norm
    normalizer = build(norm, **norm_options)
    try:
        splits = normalize(splits, normalizer)
    except ValueError as exc:
        raise OptiflowError(f"normalizer '{norm.name}': {first_line(exc)}") from None
    input_shape = tuple(splits.x_train.shape[1:])
    augmentation = _augmentation(resolved, splits.x_train[0])
    model_component, model_options = resolved.model
    _check_images(model_component, source, input_shape, resolved.data[0].name, norm.name)

    torch.manual_seed(config.seed)
    model = build(model_component, input_shape, source.num_outputs, **model_options)
    initialize(model, resolved, splits.x_train)
    _check_model_accepts(model, splits.x_train[:2], model_component.name, input_shape)
    model.to(device)
    setup = decide(config, device, model, splits.x_train, splits.y_train)
    if setup.channels_last:
        model.to(memory_format=torch.channels_last)
        splits = Splits(*(t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t
                          for t in splits.tensors()))
    loss_fn = build_loss(resolved, registry, source.task).to(device)
    length = TrainingLength.of(config.epochs, len(splits.x_train), config.batch_size, config.drop_last)
    optimizer, schedule = build_optimizer(resolved, model, length)
    rehearse(optimizer, length, lambda stand_in: build_schedule(resolved, stand_in, length), resolved.sched[0].name)
    if _SOURCES is None:  # loaded for this run alone: its splits are the one copy of the data it keeps
        source = keep_examples(source)
    return Run(config, resolved, setup, source, splits.to(device, torch.device("cpu") if setup.streamed else device),
               model, loss_fn, optimizer, schedule, length, torch.Generator().manual_seed(config.seed),
               normalizer=normalizer, input_range=input_range,
               augmentation=augmentation, regularizers=[build(c, **o) for c, o in resolved.reg], key=key)


def dataset_digest(source: DataSource) -> str:
    """:func:`~optiflow.digest.source_digest` of ``source``, once per loaded source (trials and folds share one)."""
    return _remembered(source, ("source digest",), lambda: digest.source_digest(source))


def stepped_parts(resolved: Plan, optimizer: object, schedule: Schedule) -> list[tuple[str, str, str]]:
    """``(plugin, "optimizer 'name'", module of its class)`` for the optimizer and the scheduler, the components
    the core steps outside any hook: an error raised in their code names their plugin (:func:`~optiflow.hooktrace.culprit`)."""
    (opt, _), (sched, _) = resolved.opt, resolved.sched
    return [(opt.plugin, f"optimizer '{opt.name}'", type(optimizer).__module__),
            (sched.plugin, f"scheduler '{sched.name}'", type(schedule.scheduler).__module__)]


#: raw samples a split dataset keeps: the logged model's input example
EXAMPLE_SAMPLES = 5


def keep_examples(source: DataSource) -> DataSource:
    """``source`` with only its first ``EXAMPLE_SAMPLES`` raw samples of ``x`` and ``x_test`` (the targets
    and everything else as they are): what a run keeps of a dataset loaded for it alone once its splits
    are made.  The run trains and tests on its splits; the raw tensors beside them were a second copy of
    the data (issue 24: 60,000 images held twice).  A source shared by a search's trials and folds
    (:func:`shared_data`) stays whole.  ``source`` itself is left as it is."""
    kept = copy.copy(source)
    kept.x = source.x[:EXAMPLE_SAMPLES].clone()
    if source.x_test is not None:
        kept.x_test = source.x_test[:EXAMPLE_SAMPLES].clone()
    return kept


_SOURCES: dict[tuple[Any, ...], DataSource] | None = None


@contextlib.contextmanager
def shared_data() -> Iterator[None]:
    """Within this block, runs of the same dataset (name, options, data folder, seed) load it once:
    search's trials and folds, which differ in everything but the data."""
    global _SOURCES
    outer = _SOURCES
    _SOURCES = {} if outer is None else outer
    try:
        yield
    finally:
        _SOURCES = outer


def load_source(resolved: Plan, config: RunConfig) -> DataSource:
    """The planned dataset, from the :func:`shared_data` cache when one is open."""
    dataset, options = resolved.data
    key = (dataset.name, id(dataset.factory), repr(sorted(options.items())), str(config.data_dir), config.seed)
    if _SOURCES is not None and key in _SOURCES:
        return _SOURCES[key]
    source = build(dataset, DataContext(Path(config.data_dir), config.seed), **options)
    if _SOURCES is not None:
        _SOURCES.clear()  # one dataset at a time: a search has one
        _SOURCES[key] = source
    return source


def build(component: Component, *context: object, **options: object) -> Any:
    """Call a component's factory; a ValueError or OSError it raises is about the user's input: one line."""
    try:
        return component.factory(*context, **options)
    except OptiflowError:
        raise
    except (ValueError, OSError) as exc:
        raise OptiflowError(f"{component.kind} '{component.name}': {first_line(exc)}") from None
    except (RuntimeError, MemoryError) as exc:  # sizes the user chose that do not fit in memory
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
            raise
        raise OptiflowError(f"{component.kind} '{component.name}': not enough memory for the sizes given "
                            f"({first_line(exc)[:120]})") from None


def initialize(model: nn.Module, resolved: Plan, x_train: Tensor) -> None:
    """Apply the planned initializer to every Linear and Conv layer of ``model``, or, when it says
    ``needs_batch = True`` (data-aware, like LSUV), once to the model and the training inputs."""
    component, options = resolved.init
    initializer = build(component, **options)
    if initializer is None:
        return
    if getattr(initializer, "needs_batch", False):
        initializer(model, x_train)
        return
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            initializer(module)


def build_loss(resolved: Plan, registry: Registry, task: str) -> nn.Module:
    """The planned loss, or the task's default: cross-entropy for classification, MSE for regression."""
    if resolved.loss is not None:
        component, options = resolved.loss
    else:
        component = registry.get("loss", "cross-entropy" if task == "classification" else "mse")
        options = component.resolve_options({})
    return build(component, task, **options)


def task_loss(task: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The task's plain loss, what every run's ``train_loss``, ``val_loss`` and ``test_loss`` are whatever it
    trains with: cross-entropy on the class targets (class probabilities under batch mixing) for
    classification, mean squared error for regression."""
    if task == "classification":
        return nn.functional.cross_entropy

    def mse(outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.mse_loss(outputs.reshape(targets.shape), targets)

    return mse


def is_task_loss(loss_fn: nn.Module, task: str) -> bool:
    """Whether ``loss_fn`` computes exactly :func:`task_loss`: PyTorch's cross-entropy with its defaults, or a
    loss whose ``task_loss`` attribute says so for ``task`` (the built-in MSE on regression)."""
    if getattr(loss_fn, "task_loss", None) == task:
        return True
    return (task == "classification" and type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None
            and loss_fn.label_smoothing == 0 and loss_fn.reduction == "mean" and loss_fn.ignore_index == -100)


def build_optimizer(resolved: Plan, model: nn.Module, length: TrainingLength) -> tuple[torch.optim.Optimizer, Schedule]:
    """The planned optimizer on ``model`` and its learning-rate schedule."""
    opt_component, opt_options = resolved.opt
    sets_decay = any(getattr(component.factory, "sets_weight_decay", False) for component, _ in resolved.reg)
    with keep_decay_groups(sets_decay):
        optimizer = build(opt_component, model, **opt_options)
    use_fused_kernels(optimizer)
    return optimizer, build_schedule(resolved, optimizer, length)


def build_schedule(resolved: Plan, optimizer: torch.optim.Optimizer, length: TrainingLength) -> Schedule:
    """The planned learning-rate schedule of ``optimizer``, with the warm-up every scheduler takes."""
    sched_component, sched_options = resolved.sched
    try:
        schedule = scheduled(sched_component.factory, lambda *args, **options: build(sched_component, *args, **options),
                             optimizer, length, sched_options)
    except OptiflowError as exc:
        if str(exc).startswith(f"{sched_component.kind} '{sched_component.name}'"):
            raise
        raise OptiflowError(f"scheduler '{sched_component.name}': {exc}") from None
    return schedule


def _check_images(model: Component, source: DataSource, input_shape: tuple[int, ...], dataset: str,
                  norm: str) -> None:
    """A model whose factory declares ``needs_images = True`` refuses feature vectors in one line."""
    if not getattr(model.factory, "needs_images", False) or len(input_shape) == 3:
        return
    if source.image:
        why = f"normalizer '{norm}' turns the images into vectors of shape {list(input_shape)}; use standard or per-channel"
    else:
        why = f"dataset '{dataset}' gives feature vectors of shape {list(source.input_shape)}"
    raise OptiflowError(f"model '{model.name}' needs images (channels x height x width), but {why}")


def _check_model_accepts(model: nn.Module, sample: Tensor, name: str, shape: tuple[int, ...]) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise OptiflowError(f"model '{name}' cannot take inputs of shape {list(shape)}: {first_line(exc)}") from None
    finally:
        model.train(was_training)


def _augmentation(resolved: Plan, sample: Tensor) -> Callable[[Tensor], Tensor] | None:
    """The augmentations as one function, each tried on one training ``sample`` (the random number generators
    left as they were): one whose options cannot work on these samples is refused before the run opens."""
    if not resolved.aug:
        return None
    transforms = [build(component, **options) for component, options in resolved.aug]
    with torch.random.fork_rng(devices=[]):
        for (component, _), transform in zip(resolved.aug, transforms):
            wanted = getattr(transform, "sample_ndim", None)
            if wanted is not None and wanted != sample.ndim:
                raise OptiflowError(f"augmentation '{component.name}' needs image inputs (C, H, W), "
                                    f"got a sample of shape {list(sample.shape)}")
            try:
                sample = transform(sample)
            except OptiflowError:
                raise
            except Exception as exc:
                raise OptiflowError(f"augmentation '{component.name}' cannot transform a training sample: "
                                    f"{type(exc).__name__}: {first_line(exc)}") from None

    def apply(sample: Tensor) -> Tensor:
        for transform in transforms:
            sample = transform(sample)
        return sample

    return apply
