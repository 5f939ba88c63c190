"""The training loop: components from the registry, lifecycle hooks, metrics into MLflow."""

from __future__ import annotations

import contextlib
import math
import shlex
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import Tensor, nn

import optiflow
from optiflow.config import ComponentSpec, RunConfig
from optiflow import distributed
from optiflow.data import (DataContext, DataSource, LoaderBatches, Splits, TensorBatches, evaluation_batches,
                           normalize, split)
from optiflow.errors import OptiflowError, PluginError, RunInterrupted, RunKilled, TrainingError
from optiflow.optim import decay_params  # noqa: F401  (re-exported for plugins)
from optiflow import host, recovery
from optiflow.recovery import first_line
from optiflow.registry import Component, Registry
from optiflow.schedule import Schedule, TrainingLength


FINITE_CHECK_STEPS = 16


class Reporter(Protocol):
    """Progress display driven by the runner (the CLI passes a rich one)."""

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
class Plan:
    """Every component resolved and every option typed, before anything runs."""

    config: RunConfig
    dataset: tuple[Component, dict[str, Any]]
    norm: tuple[Component, dict[str, Any]]
    aug: list[tuple[Component, dict[str, Any]]]
    model: tuple[Component, dict[str, Any]]
    loss: tuple[Component, dict[str, Any]] | None
    opt: tuple[Component, dict[str, Any]]
    sched: tuple[Component, dict[str, Any]]
    init: tuple[Component, dict[str, Any]]
    reg: list[tuple[Component, dict[str, Any]]]

    def params(self) -> dict[str, Any]:
        """Every resolved parameter, flattened as ``opt=adam``, ``opt.lr=0.001`` ..."""
        out: dict[str, Any] = {}
        for key, value in self.components():
            component, options = value
            out[key] = component.name
            for option, option_value in options.items():
                out[f"{key}.{option}"] = option_value
        for key in ("epochs", "batch_size", "seed", "val_split", "test_split", "shuffle", "drop_last", "device",
                    "workers", "pin_memory", "compile", "amp"):
            out[key] = getattr(self.config, key)
        if self.config.cv_folds:
            out.update(cv_folds=self.config.cv_folds, cv_fold=self.config.cv_fold)
        return out

    def components(self) -> list[tuple[str, tuple[Component, dict[str, Any]]]]:
        items = [("data", self.dataset), ("norm", self.norm), ("model", self.model), ("opt", self.opt),
                 ("sched", self.sched), ("init", self.init)]
        if self.loss is not None:
            items.append(("loss", self.loss))
        items += [(f"aug.{i}" if len(self.aug) > 1 else "aug", a) for i, a in enumerate(self.aug)]
        items += [(f"reg.{r[0].name}", r) for r in self.reg]
        return items


def plan(config: RunConfig, registry: Registry) -> Plan:
    """Resolve the configuration against the registry; raises OptiflowError on any mistake."""

    def resolve(kind: str, spec: ComponentSpec) -> tuple[Component, dict[str, Any]]:
        component = registry.get(kind, spec.name)
        return component, component.resolve_options(spec.options)

    opt_spec = config.opt
    if config.lr is not None:
        opt_spec = ComponentSpec(opt_spec.name, {**opt_spec.options, "lr": config.lr})
    opt = resolve("optimizer", opt_spec)
    if "lr" in opt[1] and opt[1]["lr"] is not None and opt[1]["lr"] <= 0:
        raise OptiflowError(f"learning rate must be > 0, got {opt[1]['lr']}")
    regs = [resolve("regularizer", spec) for spec in config.reg]
    names = [r[0].name for r in regs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise OptiflowError(f"regularizer '{duplicated[0]}' given twice; combine its options in one --reg")
    return Plan(
        config=config,
        dataset=resolve("dataset", config.data),
        norm=resolve("normalizer", config.norm),
        aug=[resolve("augmentation", spec) for spec in config.aug],
        model=resolve("model", config.model),
        loss=resolve("loss", config.loss) if config.loss is not None else None,
        opt=opt,
        sched=resolve("scheduler", config.sched),
        init=resolve("initializer", config.init),
        reg=regs,
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptiflowError("--device cuda was asked for, but no CUDA device is available (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptiflowError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptiflowError("--device mps was asked for, but MPS is not available")
    return device


@dataclass
class Run:
    """The live state of one training run; every lifecycle hook receives it."""

    config: RunConfig
    plan: Plan
    device: torch.device
    source: DataSource
    splits: Splits
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    length: TrainingLength
    tracker: Any = None
    normalizer: Any = None
    epoch: int = 0
    step: int = 0
    stop_reason: str | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    last_outputs: Tensor | None = None
    last_targets: Tensor | None = None
    artifacts_dir: Path | None = None
    batch_generator: torch.Generator | None = None
    #: training batches come through a DataLoader from host memory (see ``streams_batches``)
    streamed: bool = False
    #: model and images in NHWC layout (``--channels-last``, or ``use_channels_last`` when not given)
    channels_last: bool = False
    augmentation: Callable[[Tensor], Tensor] | None = None
    regularizers: list[Any] = field(default_factory=list)
    checkpoint: dict[str, Any] | None = None
    status: str | None = None

    @property
    def task(self) -> str:
        return self.source.task

    def request_stop(self, reason: str) -> None:
        """Ask the runner to end training after the current epoch."""
        self.stop_reason = self.stop_reason or reason

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log extra metrics on this run (batched with the epoch's own)."""
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.epoch if step is None else step, flush=False)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.set_tags(tags)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


@dataclass
class RunResult:
    run_id: str | None
    status: str
    metrics: dict[str, float]
    history: dict[str, list[float]]
    epochs: int
    seconds: float
    tracking_uri: str | None
    stop_reason: str | None = None
    resumed_from: int | None = None


def prepare(config: RunConfig, registry: Registry, pm: Any) -> Run:
    """Load data, build model, loss, optimizer and scheduler; raises OptiflowError on bad input.

    Everything a user can get wrong fails here, before an MLflow run exists.
    """
    resolved = plan(config, registry)
    device = resolve_device(config.device)
    cluster = distributed.current()
    if cluster.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", cluster.local_rank)
    amp_dtype(config.amp, device)
    torch.manual_seed(config.seed)
    dataset, dataset_options = resolved.dataset
    context = DataContext(Path(config.data_dir), config.seed)
    source = build(dataset, context, **dataset_options)
    splits = split(source, config.val_split, config.test_split, config.seed,
                   cv_folds=config.cv_folds, cv_fold=config.cv_fold)
    norm, norm_options = resolved.norm
    normalizer = build(norm, **norm_options)
    try:
        splits = normalize(splits, normalizer)
    except ValueError as exc:
        raise OptiflowError(f"normalizer '{norm.name}': {first_line(exc)}") from None
    input_shape = tuple(splits.x_train.shape[1:])

    torch.manual_seed(config.seed)
    model_component, model_options = resolved.model
    model = build(model_component, input_shape, source.num_outputs, **model_options)
    init_component, init_options = resolved.init
    initializer = build(init_component, **init_options)
    if initializer is not None:
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                initializer(module)
    _check_model_accepts(model, splits.x_train[:2], resolved.model[0].name, input_shape)
    model.to(device)
    channels_last = config.channels_last
    if channels_last is None:
        channels_last = use_channels_last(model, splits.x_train, device)
    elif channels_last and splits.x_train.ndim != 4:
        raise OptiflowError(
            f"--channels-last is for conv nets on images (N, C, H, W); this data has shape {list(input_shape)}"
        )
    if channels_last:
        model.to(memory_format=torch.channels_last)
        splits = Splits(*(t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t
                          for t in splits.tensors()))

    if resolved.loss is not None:
        loss_component, loss_options = resolved.loss
    else:
        loss_component = registry.get("loss", "cross-entropy" if source.task == "classification" else "mse")
        loss_options = loss_component.resolve_options({})
    loss_fn = build(loss_component, source.task, **loss_options).to(device)

    length = TrainingLength.of(config.epochs, len(splits.x_train), config.batch_size, config.drop_last)
    optimizer, schedule = build_optimizer(resolved, model, length)
    streamed = streams_batches(config, splits, device)
    return Run(config, resolved, device, source, splits.to(device, torch.device("cpu") if streamed else device), model,
               loss_fn, optimizer, schedule, length, normalizer=normalizer, streamed=streamed, channels_last=channels_last,
               batch_generator=torch.Generator().manual_seed(config.seed),
               augmentation=_augmentation(resolved), regularizers=[build(c, **o) for c, o in resolved.reg])


def build_optimizer(resolved: Plan, model: nn.Module, length: TrainingLength) -> tuple[torch.optim.Optimizer, Schedule]:
    """The planned optimizer on ``model`` and its learning-rate schedule."""
    opt_component, opt_options = resolved.opt
    optimizer = build(opt_component, model, **opt_options)
    use_fused_kernels(optimizer)
    sched_component, sched_options = resolved.sched
    schedule = build(sched_component, optimizer, length, **sched_options)
    return optimizer, schedule if isinstance(schedule, Schedule) else Schedule(schedule)


def use_fused_kernels(optimizer: torch.optim.Optimizer) -> None:
    """Switch a plain Adam, AdamW or SGD to its fused kernels, in place, when its factory left
    the choice open: one kernel per step instead of a loop over parameters (Adam's step over
    the benchmark CNN: ~28 ms -> ~7 ms on a 2-core CPU)."""
    defaults = optimizer.defaults
    if (type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD) or optimizer.state
            or defaults.get("fused") is not None or defaults.get("foreach") is not None
            or defaults.get("differentiable")):
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not all(torch.is_floating_point(p) and p.device.type in ("cpu", "cuda") for p in params):
        return
    for group in [defaults, *optimizer.param_groups]:
        group["fused"] = True
    optimizer._step_supports_amp_scaling = True  # as the constructor sets it for fused=True


def build(component: Component, *context: Any, **options: Any) -> Any:
    """Call a component's factory; a ValueError or OSError it raises is about the user's input: one line."""
    try:
        return component.factory(*context, **options)
    except OptiflowError:
        raise
    except (ValueError, OSError) as exc:
        raise OptiflowError(f"{component.kind} '{component.name}': {first_line(exc)}") from None


def streams_batches(config: RunConfig, splits: Splits, device: torch.device) -> bool:
    """Whether training batches go through a DataLoader from host memory rather than
    being sliced from one tensor on the device: for augmentation, worker processes,
    or a training split too large for the device's free memory."""
    if config.aug or config.workers > 0:
        return True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return splits.x_train.nbytes + splits.y_train.nbytes > free // 2
    return False


def use_channels_last(model: nn.Module, x: Tensor, device: torch.device) -> bool:
    """What ``--channels-last`` left unset means: NHWC for a model with 2-D convolutions on
    images (N, C, H, W) on the CPU, where oneDNN's NHWC convolutions are faster (README,
    Performance).  Off on CUDA, where it was not measured."""
    return device.type == "cpu" and x.ndim == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (None when off); fp16 needs CUDA."""
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if mode == "fp16" else torch.bfloat16
    if device.type == "cpu" and mode in ("auto", "bf16"):
        return torch.bfloat16
    raise OptiflowError(f"--amp {mode} is not supported on {device.type}: use --amp bf16 on CPU, fp16 or bf16 on CUDA")


def _check_model_accepts(model: nn.Module, sample: Tensor, name: str, shape: tuple[int, ...]) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise OptiflowError(
            f"model '{name}' cannot take inputs of shape {list(shape)}: {str(exc).splitlines()[0]}"
        ) from None
    finally:
        model.train(was_training)


def train(
    config: RunConfig,
    *,
    registry: Registry | None = None,
    pm: Any = None,
    reporter: Reporter | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    log_model: bool = True,
    extra_params: dict[str, Any] | None = None,
    resume: str | None = None,
) -> RunResult:
    """Train one model as ``config`` says and track it as one MLflow run.

    ``on_epoch`` is called after every epoch's metrics are logged (search uses
    it to report to Optuna and to prune; raising RunKilled there ends the run
    KILLED).  ``extra_params`` are logged beside the resolved ones.  ``resume`` is the id of a KILLED or
    FAILED run to continue from its checkpoint, in that same run (``config``
    must be its logged configuration: see ``resume_config``).  Raises
    OptiflowError for bad input before the run starts, TrainingError when
    training diverges, PluginError when a plugin raises, RunInterrupted (a
    KeyboardInterrupt) on SIGINT/SIGTERM; the run then ends FAILED or KILLED
    with a ``failure`` tag, what was logged kept and a checkpoint saved.
    """
    from optiflow.plugins import get_plugin_manager, get_registry
    from optiflow.tracking import NullTracker, Tracker, client, resolve_tracking_uri

    registry = registry or get_registry()
    pm = pm or get_plugin_manager()
    reporter = reporter or SilentReporter()
    run = prepare(config, registry, pm)
    if run.device.type == "cpu":
        host.keep_freed_memory()
    with _per_run_plugins(run, pm) as names:
        _check_run(run, pm, names)
        cluster = distributed.join(run.device)
        tracker = Tracker(config.tracking_uri, config.experiment) if cluster.main else NullTracker()
        state = None
        if resume is not None:
            uri = resolve_tracking_uri(config.tracking_uri)
            store = client(uri)
            recovery.check_resumable(store, uri, resume)
            state = recovery.load(store, resume)
        tags = {"optiflow.version": optiflow.__version__, "optiflow.command": _command_line(), **(extra_tags or {})}
        tracker.start(run_name=config.run_name, tags=tags, parent_run_id=parent_run_id, run_id=resume)
        run.tracker = tracker
        started = time.perf_counter()
        with recovery.InterruptGuard():
            try:
                if state is None:
                    _log_setup(run)
                    if extra_params:
                        tracker.log_params(extra_params)
                else:
                    recovery.restore(run, state)
                    run.checkpoint = state
                    tracker.delete_tag("failure")
                    tracker.set_tags({"optiflow.resumed_from_epoch": run.epoch})
                resumed_from = run.epoch if state is not None else None
                pm.hook.optiflow_run_start(run=run)
                if state is not None:
                    recovery.restore_rng(run, state)
                _fit(run, pm, reporter, on_epoch)
                reporter.stop()
                run.status = "FINISHED"
                pm.hook.optiflow_run_end(run=run, status="FINISHED")
                metrics = _finish(run, log_model=log_model)
                seconds = time.perf_counter() - started
                tracker.log_metrics({"train_seconds": seconds}, step=run.epoch)
                tracker.end("FINISHED")
            except BaseException as exc:
                error = _fail(run, pm, reporter, exc, names)
                if error is exc:
                    raise
                raise error from exc
    return RunResult(tracker.run_id, "FINISHED", metrics, run.history, run.epoch, seconds, tracker.uri,
                     run.stop_reason, resumed_from)


def resume_config(run_id: str, tracking_uri: str | None = None, **overrides: Any) -> RunConfig:
    """The logged configuration of KILLED or FAILED run ``run_id``, for ``train(config, resume=run_id)``.

    ``overrides`` may only change where and how the run is computed
    (``device``, ``tracking_uri``), never what is trained.
    """
    from optiflow.tracking import client, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    values = recovery.resumable_config(client(uri), uri, run_id)
    return RunConfig.from_dict({**values, **{k: v for k, v in overrides.items() if v is not None}, "tracking_uri": uri})


@contextlib.contextmanager
def _per_run_plugins(run: Run, pm: Any) -> Iterator[dict[str, str]]:
    """Register the run's ``--reg`` objects as plugins for as long as the run lasts; yields
    ``{plugin name: "regularizer 'x'"}`` for naming them in errors."""
    names = {f"{c.name}@{id(run):x}#{i}": f"regularizer '{c.name}'" for i, (c, _) in enumerate(run.plan.reg)}
    try:
        for name, regularizer in zip(names, run.regularizers):
            pm.register(regularizer, name=name)
        yield names
    finally:
        for name in names:
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)


def _check_run(run: Run, pm: Any, names: dict[str, str]) -> None:
    """``optiflow_check_run``: plugins refuse combinations they cannot work with before any run is logged."""
    try:
        pm.hook.optiflow_check_run(run=run)
    except OptiflowError:
        raise
    except Exception as exc:
        plugin, hook = recovery.culprit(pm, exc) or ("?", "optiflow_check_run")
        raise PluginError(f"plugin {names.get(plugin, repr(plugin))} failed in {hook}: {type(exc).__name__}: "
                          f"{first_line(exc)}", plugin) from exc


def _fail(run: Run, pm: Any, reporter: Reporter, exc: BaseException, names: dict[str, str]) -> BaseException:
    """Close the run FAILED or KILLED (failure tag, checkpoint, traceback) and return the error to raise."""
    tracker = run.tracker
    reporter.stop()
    if isinstance(exc, RunKilled):
        run.status = run.status or "KILLED"
        try:
            tracker.set_tags({"killed": str(exc)})
        finally:
            tracker.end("KILLED")
        return exc
    interrupted = isinstance(exc, KeyboardInterrupt)
    status = "KILLED" if interrupted else "FAILED"
    where = recovery.culprit(pm, exc) if not interrupted else None
    if interrupted:
        reason = str(exc) if isinstance(exc, RunInterrupted) else "interrupted by SIGINT"
    elif isinstance(exc, OptiflowError):
        reason = str(exc)
    else:
        reason = f"{type(exc).__name__}: {first_line(exc)}"
    if where is not None:
        plugin, hook = where
        reason = f"plugin {names.get(plugin, repr(plugin))} failed in {hook}: {reason}"
    saved = ""
    try:
        if run.status is None:
            run.status = status
            try:
                pm.hook.optiflow_run_end(run=run, status=status)
            except Exception:
                pass
        tracker.set_tags({"failure": reason[:5000]})
        if not isinstance(exc, OptiflowError):
            tracker.log_text("".join(traceback.format_exception(exc)), "failure.txt")
        if run.checkpoint is not None:
            recovery.save(tracker, run.checkpoint)
            saved = f"; checkpoint of epoch {run.checkpoint['epoch']} saved, resume with: optiflow train --resume {tracker.run_id}"
    finally:
        tracker.end(status)
    message = f"{reason} (run {tracker.run_id} ended {status}{saved})"
    if interrupted:
        return RunInterrupted(getattr(exc, "signum", signal.SIGINT), message)
    if where is not None:
        return PluginError(message, where[0])
    if isinstance(exc, OptiflowError):
        error = type(exc)(message)
        error.exit_code = exc.exit_code
        return error
    exc.__notes__ = [*getattr(exc, "__notes__", []), f"run {tracker.run_id} ended FAILED; its traceback is the failure.txt artifact"]
    return exc


def _fit(run: Run, pm: Any, reporter: Reporter, on_epoch: Callable | None) -> None:
    config = run.config
    cluster = distributed.current()
    batches = _training_batches(run, cluster)
    step = _step_function(run, pm, cluster)
    hook = pm.hook
    classification = run.task == "classification"
    step_schedule = run.schedule.interval == "step"
    log_step_loss = config.log_step_loss
    reporter.start(config.epochs, len(batches))
    for epoch in range(run.epoch + 1, config.epochs + 1):
        run.epoch = epoch
        run.model.train()
        hook.optiflow_epoch_start(run=run, epoch=epoch)
        started = time.perf_counter()
        lr = run.lr
        loss_sum = torch.zeros((), device=run.device)
        correct = torch.zeros((), device=run.device, dtype=torch.long)
        seen = 0
        for xb, yb in batches:
            run.step += 1
            loss, outputs = step(xb, yb)
            loss_sum.add_(loss, alpha=len(xb))
            if log_step_loss:
                run.log_metrics({"train_loss_step": float(loss)}, step=run.step)
            if classification:
                correct.add_((outputs.argmax(1) == yb).sum())
            seen += len(xb)
            if step_schedule:
                run.schedule.step()
            reporter.batch()
            if run.step % FINITE_CHECK_STEPS == 0:
                _check_finite(loss_sum, run, lr)
        _check_finite(loss_sum, run, lr)
        loss_total, correct_total, seen = cluster.sum_floats([loss_sum, correct, seen], run.device)
        train_loss = loss_total / max(seen, 1)
        seconds = time.perf_counter() - started
        metrics = {"train_loss": train_loss, "lr": lr, "epoch_time": seconds, "samples_per_sec": seen / seconds}
        if classification:
            metrics["train_accuracy"] = correct_total / max(seen, 1)
        if len(run.splits.x_val):
            metrics.update(evaluate(run, run.splits.x_val, run.splits.y_val, "val"))
        hook.optiflow_validation_end(run=run, epoch=epoch, metrics=metrics)
        metrics = cluster.share(metrics)
        if run.schedule.interval == "epoch":
            run.schedule.step(metrics)
        hook.optiflow_epoch_end(run=run, epoch=epoch, metrics=metrics)
        run.stop_reason = cluster.share(run.stop_reason)
        _record_epoch(run, metrics)
        reporter.epoch(epoch, metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if run.stop_reason:
            run.tracker.set_tags({"stopped_early": run.stop_reason, "stopped_epoch": epoch})
            break


def _training_batches(run: Run, cluster: distributed.Cluster) -> TensorBatches | LoaderBatches:
    """In-memory batches when the training split lives on the device, else a DataLoader."""
    config = run.config
    batch_size = len(run.splits.x_train) if config.batch_size == "full" else int(config.batch_size)
    common = dict(shuffle=config.shuffle, drop_last=config.drop_last, generator=run.batch_generator, rank=cluster.rank,
                  world_size=cluster.world_size)
    if not run.streamed:
        return TensorBatches(run.splits.x_train, run.splits.y_train, batch_size, **common)
    return LoaderBatches(run.splits.x_train, run.splits.y_train, batch_size, device=run.device,
                         transform=run.augmentation, workers=config.workers, pin_memory=config.pin_memory,
                         **common)


def _step_function(run: Run, pm: Any, cluster: distributed.Cluster) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """One optimization step on a batch, returning its loss and outputs (detached).

    Built once per run so that the per-step path does no hook look-ups, no
    option checks and no host synchronisation: hooks nobody implements are not
    called, autocast/GradScaler/channels-last/DDP/compile are decided here.
    """
    hook = pm.hook
    penalties = hook.optiflow_penalty if hook.optiflow_penalty.get_hookimpls() else None
    after_backward = hook.optiflow_after_backward if hook.optiflow_after_backward.get_hookimpls() else None
    after_step = hook.optiflow_after_step if hook.optiflow_after_step.get_hookimpls() else None
    optimizer, loss_fn = run.optimizer, run.loss_fn
    model = _training_model(run, cluster)
    dtype = amp_dtype(run.config.amp, run.device)
    device_type = run.device.type
    scaler = torch.amp.GradScaler(device_type) if dtype is torch.float16 else None
    channels_last = run.channels_last

    def forward_backward(xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            outputs = model(xb)
            run.last_outputs, run.last_targets = outputs, yb
            loss = loss_fn(outputs, yb)
        total = loss
        if penalties is not None:
            for penalty in penalties(run=run):
                total = total + penalty
        (total if scaler is None else scaler.scale(total)).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if after_backward is not None:
            after_backward(run=run, step=run.step)
        return total, loss, outputs

    def step(xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        if scaler is not None:
            _, loss, outputs = forward_backward(xb, yb)
            scaler.step(optimizer)
            scaler.update()
        else:
            last: list[Tensor] = []

            def closure() -> Tensor:
                total, loss, outputs = forward_backward(xb, yb)
                last[:] = loss, outputs
                return total

            optimizer.step(closure)
            loss, outputs = last
        if after_step is not None:
            after_step(run=run, step=run.step)
        return loss.detach(), outputs.detach()

    return step


def _training_model(run: Run, cluster: distributed.Cluster) -> nn.Module:
    """``run.model`` as the training step calls it: DDP-wrapped across processes, compiled on ``--compile``."""
    model: nn.Module = run.model
    if cluster.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.config.compile:
        model = torch.compile(model, dynamic=False)
    return model


def _check_finite(loss_sum: Tensor, run: Run, lr: float) -> None:
    """Stop at once when the running training loss is NaN or infinite (one host sync per call)."""
    if not bool(torch.isfinite(loss_sum)):
        raise TrainingError(
            f"the training loss became {float(loss_sum)} at step {run.step} (epoch {run.epoch}, lr={lr:g}): "
            "lower the learning rate or add gradient clipping (--reg grad-clip)"
        )


def _record_epoch(run: Run, metrics: dict[str, float]) -> None:
    """Log the epoch's metrics and keep a checkpoint of it, as one step no signal can split."""
    with recovery.deferred():
        for key, value in metrics.items():
            run.history.setdefault(key, []).append(value)
        run.tracker.log_metrics(metrics, step=run.epoch)
        run.checkpoint = recovery.capture(run)


def _augmentation(plan: Plan) -> Callable[[Tensor], Tensor] | None:
    if not plan.aug:
        return None
    transforms = [build(component, **options) for component, options in plan.aug]

    def apply(sample: Tensor) -> Tensor:
        for transform in transforms:
            sample = transform(sample)
        return sample

    return apply


def evaluate(run: Run, x: Tensor, y: Tensor, prefix: str) -> dict[str, float]:
    """Loss (and accuracy, or RMSE/R² for regression) of the model on ``x``, ``y`` in eval mode."""
    model = run.model
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    outputs_all = []
    with torch.no_grad():
        for xb, yb in evaluation_batches(x, y):
            outputs = model(xb)
            loss_sum += run.loss_fn(outputs, yb) * len(xb)
            if run.task == "classification":
                correct += (outputs.argmax(1) == yb).sum()
            else:
                outputs_all.append(outputs.reshape(yb.shape))
    model.train(was_training)
    n = max(len(x), 1)
    metrics = {f"{prefix}_loss": float(loss_sum) / n}
    if run.task == "classification":
        metrics[f"{prefix}_accuracy"] = float(correct) / n
    elif outputs_all:
        predictions = torch.cat(outputs_all)
        residual = ((predictions - y) ** 2).sum()
        total = ((y - y.mean()) ** 2).sum().clamp_min(1e-12)
        metrics[f"{prefix}_rmse"] = float(torch.sqrt(residual / n))
        metrics[f"{prefix}_r2"] = float(1 - residual / total)
    return metrics


def _log_setup(run: Run) -> None:
    tracker = run.tracker
    params = run.plan.params()
    params.update({f"data.n_{k}": v for k, v in run.splits.sizes().items()})
    params["data.input_shape"] = list(run.splits.x_train.shape[1:])
    params["model.parameters"] = sum(p.numel() for p in run.model.parameters())
    params["device_type"] = run.device.type
    params["channels_last"] = run.channels_last  # resolved: --channels-last may be left to auto
    tracker.log_params(params)
    tracker.log_text(run.config.to_yaml(), "config.yaml")
    state = run.normalizer.state() if hasattr(run.normalizer, "state") else {}
    if state:
        import json

        tracker.log_text(json.dumps(_jsonable(state), indent=2), "normalization.json")


def _finish(run: Run, log_model: bool) -> dict[str, float]:
    from optiflow.plots import learning_curves

    tracker = run.tracker
    test = evaluate(run, run.splits.x_test, run.splits.y_test, "test")
    tracker.log_metrics(test, step=run.epoch)
    figure = learning_curves(run.history, title=f"{run.plan.model[0].name} / {run.plan.opt[0].name}")
    tracker.log_figure(figure, "learning_curves.png")
    import matplotlib.pyplot as plt

    plt.close(figure)
    if log_model:
        example = run.splits.x_test[:5].detach().cpu().numpy()
        tracker.log_model(run.model, example)
    return test


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _command_line() -> str:
    return shlex.join(["optiflow", *sys.argv[1:]]) if sys.argv and "optiflow" in sys.argv[0] else shlex.join(sys.argv)
