"""The hook specifications every optiflow plugin, built-in or third-party, implements.

Registration hooks receive a ``register`` callable; the core owns naming,
option parsing and duplicate handling.  Lifecycle hooks receive the live
:class:`optiflow.run.Run` and fire in the order documented in docs/plugins.md.
"""

import pluggy

hookspec = pluggy.HookspecMarker("optiflow")
hookimpl = pluggy.HookimplMarker("optiflow")


@hookspec
def optiflow_register_data(register):
    """Register datasets, normalizers and augmentations.

    Called once when the registry is built.  ``register(name, factory,
    description=None, *, kind="dataset", aliases=(), namespaced_only=False)`` adds
    one component (every hook's ``register`` takes the same arguments; ``namespaced_only``
    registers it as ``plugin/name`` only, see docs/plugins.md);
    ``kind`` is ``"dataset"``, ``"normalizer"`` or ``"augmentation"``.
    Keyword-only parameters of ``factory`` become the component's options.

    - dataset: ``factory(ctx: DataContext, **options) -> DataSource``
    - normalizer: ``factory(**options) -> Normalizer`` (``fit``/``transform``/``state``)
    - augmentation: ``factory(**options) -> callable`` applied to one CHW image tensor
    Returns nothing.
    """


@hookspec
def optiflow_register_models(register):
    """Register models, activations and losses.

    Called once when the registry is built.  ``kind`` is ``"model"``
    (default), ``"activation"`` or ``"loss"``.

    - model: ``factory(input_shape: tuple[int, ...], num_outputs: int, **options) -> nn.Module``
      returning raw outputs (logits for classification).
    - activation: ``factory(**options) -> nn.Module``
    - loss: ``factory(task: str, **options) -> nn.Module`` taking (outputs, targets)
    Returns nothing.
    """


@hookspec
def optiflow_register_optimizers(register):
    """Register optimizers.

    Called once when the registry is built.
    ``factory(model: nn.Module, **options) -> torch.optim.Optimizer``; build
    the parameter groups with ``optiflow.optim.decay_params(model)`` so that
    biases and normalization parameters get no weight decay.
    Returns nothing.
    """


@hookspec
def optiflow_register_regularizers(register):
    """Register regularizers.

    Called once when the registry is built.  ``factory(**options) -> object``;
    the object is registered as a pluggy plugin for the duration of one run,
    so it regularizes by implementing lifecycle hooks (``optiflow_penalty``,
    ``optiflow_after_backward``, ``optiflow_epoch_end`` ...).
    Returns nothing.
    """


@hookspec
def optiflow_register_schedulers(register):
    """Register learning-rate schedulers.

    Called once when the registry is built.
    ``factory(optimizer, length: TrainingLength, **options) -> Schedule`` where
    ``Schedule(scheduler, interval="epoch"|"step", monitor=None)`` says when
    the core steps it and which metric (if any) it is stepped with.
    Returns nothing.
    """


@hookspec
def optiflow_register_initializers(register):
    """Register weight initializers.

    Called once when the registry is built.  ``factory(**options) -> callable``;
    the callable receives every ``nn.Linear``/``nn.Conv*`` layer of the model
    and initializes its weight (and bias) in place.  A data-aware initializer
    (LSUV) sets ``needs_batch = True`` on its callable, which is then called once
    as ``callable(model, x)`` with the normalized training inputs (on the CPU).
    Returns nothing.
    """


@hookspec
def optiflow_register_commands(cli):
    """Add subcommands to the ``optiflow`` command line.

    Called once, the first time the CLI needs the full command list (``optiflow
    --help`` or an unknown command name), never at import time.  ``cli`` is a
    ``click.Group``: use ``@cli.command()`` or ``cli.add_command(command)``.
    A name that is already taken rejects the plugin.  Returns nothing.
    """


@hookspec
def optiflow_check_run(run):
    """Called once per run when the data, model, loss, optimizer and scheduler
    exist, before the MLflow run opens (``run.tracker`` is None).  The place to
    refuse a combination the plugin cannot work with: raise
    :class:`optiflow.errors.OptiflowError` with one line saying what to change;
    the user sees that line and no run is logged.  Returns nothing."""


@hookspec
def optiflow_metric_names(run):
    """Called once per run right before ``optiflow_check_run`` (``run.tracker`` is None).  Return the
    names of the metrics this plugin adds in ``optiflow_validation_end``, or None.  A scheduler or early
    stopping monitors the core's epoch metrics or declared ones: a name nobody produces (``val_los``) is
    refused before the run opens.  ``run.metric_names`` holds them all for ``optiflow_check_run``.
    (Metrics added in ``optiflow_epoch_end`` are logged, but come after the scheduler's step: declare them
    with ``optiflow_epoch_metric_names``.)"""


@hookspec
def optiflow_epoch_metric_names(run):
    """Called once per run with ``optiflow_metric_names``.  Return the names of the metrics this plugin adds in
    ``optiflow_epoch_end`` (logged and rankable by compare's and search's ``--metric``, not monitored), or
    None.  With every such plugin declaring them, a ``--metric`` no run logs is refused before anything trains;
    a third-party plugin adding epoch metrics without declaring any defers that check until after training."""


@hookspec
def optiflow_run_start(run):
    """Called once per run, after the model, optimizer and scheduler exist and
    the MLflow run is open, before the first epoch.  ``run`` is the live
    :class:`optiflow.run.Run`.  Returns nothing."""


@hookspec
def optiflow_epoch_start(run, epoch):
    """Called at the start of every epoch (``epoch`` counts from 1, equal to
    ``run.epoch``), with the model in training mode.  Returns nothing."""


@hookspec
def optiflow_train_batch(run, x, y):
    """Called for every training batch, on the device, before the optimization step (and once
    per step, however often the optimizer re-evaluates the loss).  Return ``(x, y)``
    transformed (mixup, cutmix ...) or None to keep the batch.  Implementations are chained:
    each receives the batch the previous one returned.  ``y`` may become soft targets, a float
    ``(N, classes)`` tensor of class probabilities, which the built-in losses accept; the
    training accuracy then compares predictions with ``y.argmax(1)``."""


@hookspec
def optiflow_penalty(run):
    """Called for every evaluation of the loss (once per training batch, twice for SAM-like
    optimizers) after the forward pass, before ``backward()``.  Return a scalar tensor to add to the loss being minimized
    (e.g. an L1/L2 penalty) or None.  ``run.last_outputs`` and
    ``run.last_targets`` hold this batch's outputs and targets.  The logged
    ``train_objective`` includes penalties; ``train_loss`` is the task's plain loss and excludes them."""


@hookspec
def optiflow_after_backward(run, step):
    """Called after ``loss.backward()`` and before ``optimizer.step()`` on
    every training batch (``step`` counts batches from 1 across epochs,
    equal to ``run.step``): the place to read, clip or perturb gradients.
    Optimizers that re-evaluate the loss (LBFGS) call it once per evaluation.
    Returns nothing."""


@hookspec
def optiflow_after_step(run, step):
    """Called after ``optimizer.step()`` on every training batch, before a
    per-step scheduler steps (``step`` as in ``optiflow_after_backward``):
    the place to track the new weights, e.g. an exponential moving average.
    Returns nothing."""


@hookspec
def optiflow_validation_end(run, epoch, metrics):
    """Called every epoch right after the validation pass, before the
    scheduler steps and before ``optiflow_epoch_end``.  ``metrics`` is the
    mutable dict of this epoch's metrics (``train_loss``, ``val_loss``,
    ``val_accuracy`` ...; no ``val_*`` when the validation split is empty):
    add or replace entries to compute extra validation metrics, which a
    monitoring scheduler, early stopping and MLflow then see.  Returns nothing."""


@hookspec
def optiflow_epoch_end(run, epoch, metrics):
    """Called at the end of every epoch, after validation and the epoch's
    scheduler step, before the metrics are logged.  ``metrics`` is the mutable
    dict about to be logged with ``step=epoch``: add entries to log more.
    Call ``run.request_stop(reason)`` to end training after this epoch.
    Returns nothing."""


@hookspec
def optiflow_run_end(run, status):
    """Called once when training ends, with ``status`` ``"FINISHED"``,
    ``"FAILED"`` or ``"KILLED"``, while the MLflow run is still open and
    before the test split is evaluated and the model logged.  Returns nothing."""


@hookspec
def optiflow_test_end(run, metrics, predictions):
    """Called once when a run that trained to its end has scored its test split,
    after ``optiflow_run_end`` and before the test metrics and the model are
    logged.  ``metrics`` is the mutable dict of test metrics (``test_loss``,
    ``test_accuracy`` or ``test_rmse``/``test_r2``): add entries to log more.
    ``predictions`` is the model's output on ``run.splits.x_test`` (logits, or
    values for regression), on the device, row by row with ``run.splits.y_test``
    (None when the test split is empty).  Not called for runs that fail or are
    killed; called for search trials and CV folds too.  If it raises, the test
    metrics and the model are logged, then the run ends FAILED naming the
    plugin.  Returns nothing."""
