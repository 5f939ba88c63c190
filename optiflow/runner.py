"""The training loop: components from the registry, lifecycle hooks, metrics into MLflow."""

from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

import optiflow
from optiflow.config import ComponentSpec, RunConfig
from optiflow.data import DataContext, DataSource, Splits, TensorBatches, evaluation_batches, normalize, split
from optiflow.errors import OptiflowError, TrainingError
from optiflow.optim import decay_params  # noqa: F401  (re-exported for plugins)
from optiflow.registry import Component, Registry
from optiflow.schedule import Schedule, TrainingLength


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
        for key in ("epochs", "batch_size", "seed", "val_split", "test_split", "shuffle", "drop_last", "device"):
            out[key] = getattr(self.config, key)
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


def prepare(config: RunConfig, registry: Registry, pm: Any) -> Run:
    """Load data, build model, loss, optimizer and scheduler; raises OptiflowError on bad input.

    Everything a user can get wrong fails here, before an MLflow run exists.
    """
    resolved = plan(config, registry)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    dataset, dataset_options = resolved.dataset
    context = DataContext(Path(config.data_dir), config.seed)
    source = dataset.factory(context, **dataset_options)
    splits = split(source, config.val_split, config.test_split, config.seed)
    norm, norm_options = resolved.norm
    normalizer = norm.factory(**norm_options)
    splits = normalize(splits, normalizer)
    input_shape = tuple(splits.x_train.shape[1:])

    torch.manual_seed(config.seed)
    model_component, model_options = resolved.model
    model = model_component.factory(input_shape, source.num_outputs, **model_options)
    init_component, init_options = resolved.init
    initializer = init_component.factory(**init_options)
    if initializer is not None:
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                initializer(module)
    _check_model_accepts(model, splits.x_train[:2], resolved.model[0].name, input_shape)
    model.to(device)

    if resolved.loss is not None:
        loss_component, loss_options = resolved.loss
    else:
        loss_component = registry.get("loss", "cross-entropy" if source.task == "classification" else "mse")
        loss_options = loss_component.resolve_options({})
    loss_fn = loss_component.factory(source.task, **loss_options).to(device)

    batch_size = len(splits.x_train) if config.batch_size == "full" else int(config.batch_size)
    batches = math.ceil(len(splits.x_train) / batch_size)
    if config.drop_last:
        batches = max(1, len(splits.x_train) // batch_size)
    length = TrainingLength(config.epochs, batches)
    opt_component, opt_options = resolved.opt
    optimizer = opt_component.factory(model, **opt_options)
    sched_component, sched_options = resolved.sched
    schedule = sched_component.factory(optimizer, length, **sched_options)
    if not isinstance(schedule, Schedule):
        schedule = Schedule(schedule)
    return Run(config, resolved, device, source, splits.to(device), model, loss_fn, optimizer, schedule,
               length, normalizer=normalizer)


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
) -> RunResult:
    """Train one model as ``config`` says and track it as one MLflow run.

    ``on_epoch`` is called after every epoch's metrics are logged (search uses
    it to report to Optuna and to prune).  Raises OptiflowError for bad input
    before the run starts, TrainingError when training diverges, and
    re-raises KeyboardInterrupt after marking the run KILLED.
    """
    from optiflow.plugins import get_plugin_manager, get_registry
    from optiflow.tracking import Tracker

    registry = registry or get_registry()
    pm = pm or get_plugin_manager()
    reporter = reporter or SilentReporter()
    run = prepare(config, registry, pm)
    tracker = Tracker(config.tracking_uri, config.experiment)
    tags = {"optiflow.version": optiflow.__version__, "optiflow.command": _command_line(), **(extra_tags or {})}
    tracker.start(run_name=config.run_name, tags=tags, parent_run_id=parent_run_id)
    run.tracker = tracker
    regularizers = [component.factory(**options) for component, options in run.plan.reg]
    started = time.perf_counter()
    status = "FAILED"
    for index, regularizer in enumerate(regularizers):
        pm.register(regularizer, name=f"run-{tracker.run_id}-reg-{index}")
    try:
        _log_setup(run)
        pm.hook.optiflow_run_start(run=run)
        _fit(run, pm, reporter, on_epoch)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        tracker.set_tags({"failure": "interrupted by the user"})
        raise
    except TrainingError as exc:
        tracker.set_tags({"failure": str(exc)})
        raise
    except Exception as exc:
        tracker.set_tags({"failure": f"{type(exc).__name__}: {exc}"[:5000]})
        raise
    finally:
        reporter.stop()
        try:
            pm.hook.optiflow_run_end(run=run, status=status)
        finally:
            for index in range(len(regularizers)):
                pm.unregister(name=f"run-{tracker.run_id}-reg-{index}")
            if status != "FINISHED":
                tracker.end(status)
    metrics = _finish(run, log_model=log_model)
    seconds = time.perf_counter() - started
    tracker.log_metrics({"train_seconds": seconds}, step=run.epoch)
    tracker.end("FINISHED")
    return RunResult(tracker.run_id, "FINISHED", metrics, run.history, run.epoch, seconds, tracker.uri,
                     run.stop_reason)


def _fit(run: Run, pm: Any, reporter: Reporter, on_epoch: Callable | None) -> None:
    config = run.config
    generator = torch.Generator().manual_seed(config.seed)
    transform = _augmentation(run)
    batch_size = len(run.splits.x_train) if config.batch_size == "full" else int(config.batch_size)
    batches = TensorBatches(run.splits.x_train, run.splits.y_train, batch_size, shuffle=config.shuffle,
                            drop_last=config.drop_last, generator=generator, transform=transform)
    hook = pm.hook
    penalties = bool(hook.optiflow_penalty.get_hookimpls())
    classification = run.task == "classification"
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

            def closure() -> Tensor:
                run.optimizer.zero_grad(set_to_none=True)
                outputs = run.model(xb)
                run.last_outputs, run.last_targets = outputs, yb
                loss = run.loss_fn(outputs, yb)
                total = loss
                if penalties:
                    for penalty in hook.optiflow_penalty(run=run):
                        total = total + penalty
                total.backward()
                hook.optiflow_after_backward(run=run, step=run.step)
                closure.loss = loss  # type: ignore[attr-defined]
                return total

            run.optimizer.step(closure)
            hook.optiflow_after_step(run=run, step=run.step)
            loss_sum += closure.loss.detach() * len(xb)  # type: ignore[attr-defined]
            if config.log_step_loss:
                run.log_metrics({"train_loss_step": float(closure.loss.detach())}, step=run.step)  # type: ignore[attr-defined]
            if classification:
                correct += (run.last_outputs.detach().argmax(1) == yb).sum()
            seen += len(xb)
            if run.schedule.interval == "step":
                run.schedule.step()
            reporter.batch()
        train_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(train_loss):
            raise TrainingError(
                f"the training loss became {train_loss} in epoch {epoch} (lr={lr:g}): "
                "lower the learning rate or add gradient clipping (--reg grad-clip)"
            )
        seconds = time.perf_counter() - started
        metrics = {"train_loss": train_loss, "lr": lr, "epoch_time": seconds, "samples_per_sec": seen / seconds}
        if classification:
            metrics["train_accuracy"] = float(correct) / max(seen, 1)
        if len(run.splits.x_val):
            metrics.update(evaluate(run, run.splits.x_val, run.splits.y_val, "val"))
        hook.optiflow_validation_end(run=run, epoch=epoch, metrics=metrics)
        if run.schedule.interval == "epoch":
            run.schedule.step(metrics)
        hook.optiflow_epoch_end(run=run, epoch=epoch, metrics=metrics)
        for key, value in metrics.items():
            run.history.setdefault(key, []).append(value)
        run.tracker.log_metrics(metrics, step=epoch)
        reporter.epoch(epoch, metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if run.stop_reason:
            run.tracker.set_tags({"stopped_early": run.stop_reason, "stopped_epoch": epoch})
            break


def _augmentation(run: Run) -> Callable[[Tensor], Tensor] | None:
    if not run.plan.aug:
        return None
    transforms = [component.factory(**options) for component, options in run.plan.aug]

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
