"""The flags shared by the commands that train, and how they layer over a ``--config`` file."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from optiflow.slots import SLOTS
from optiflow.values import key_name

if TYPE_CHECKING:
    from optiflow.config import RunConfig

COMPONENT_HELP = "NAME[:key=value,...]"
Command = Callable[..., Any]


#: every flag of the commands that train, by parameter name (the component flags derive from the slot table)
TRAIN_FLAGS: dict[str, Callable[[Command], Command]] = {
    "config_file": click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file with the keys of the training flags (flags win)."),
    **{slot.key: click.option(f"--{slot.key}", multiple=slot.repeatable, metavar=COMPONENT_HELP, help=slot.help)
       for slot in SLOTS},
    "data_dir": click.option("--data-dir", type=click.Path(file_okay=False), help="Where file-based datasets live [data]."),
    "epochs": click.option("--epochs", type=int, help="Training epochs [20]."),
    "batch_size": click.option("--batch-size", help="Mini-batch size, or 'full' for whole-batch gradient descent [32]."),
    "lr": click.option("--lr", type=float, help="Learning rate (overrides the optimizer's default; a wrapper such as "
                                               "sam:base=[sgd] without an lr passes it to the optimizer it wraps)."),
    "seed": click.option("--seed", type=int, help="Random seed for splits, initialization and batching [0]."),
    "device": click.option("--device", help="auto, cpu, cuda or cuda:N [auto]."),
    "val_split": click.option("--val-split", type=float, help="Fraction of the training data held out for validation [0.1]."),
    "test_split": click.option("--test-split", type=float, help="Fraction held out for testing when the dataset has no test set [0.2]."),
    "shuffle": click.option("--shuffle/--no-shuffle", default=None, help="Shuffle training batches every epoch [shuffle]."),
    "drop_last": click.option("--drop-last/--keep-last", default=None, help="Drop the last incomplete batch [keep-last]."),
    "log_step_loss": click.option("--log-step-loss", is_flag=True, default=None,
                                  help="Also log every batch's training loss as train_loss_step (step = batch number)."),
    "workers": click.option("--workers", type=int, help="DataLoader worker processes; > 0 streams batches through a DataLoader [0: in-memory batches, or the main process when augmenting]."),
    "pin_memory": click.option("--pin-memory/--no-pin-memory", default=None, help="Page-locked host batches on the DataLoader path, copied to CUDA without blocking [no-pin-memory]."),
    "compile": click.option("--compile/--no-compile", default=None, help="Compile the model with torch.compile (first epoch pays the compile time) [no-compile]."),
    "channels_last": click.option("--channels-last/--no-channels-last", default=None, help="NHWC memory layout for conv nets on image data [auto: on for conv nets on images on the CPU]."),
    "amp": click.option("--amp", type=click.Choice(["off", "auto", "bf16", "fp16"]), is_flag=False, flag_value="auto", help="Mixed precision autocast; bare --amp picks bf16 (fp16 with a GradScaler on CUDA without bf16); CPU supports bf16 only [off]."),
    "deterministic": click.option("--deterministic/--no-deterministic", default=None, help="Deterministic algorithms only (torch.use_deterministic_algorithms) and one CPU thread: the same device gives the same weights bit for bit (optiflow reproduce checks) [no-deterministic]."),
    "experiment": click.option("--experiment", help="MLflow experiment name [optiflow]."),
    "run_name": click.option("--run-name", help="MLflow run name."),
    "tracking_uri": click.option("--tracking-uri", help="MLflow tracking URI [$MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db]."),
    "reuse": click.option("--reuse/--no-reuse", default=None, help="A run whose content key (configuration, data, versions: docs/tracking.md) a FINISHED run of the experiment holds is that run, not trained again; --no-reuse trains anew [reuse]."),
}


def train_options(func: Command) -> Command:
    """The flags shared by every command that trains (train, compare, search)."""
    return train_flags(*TRAIN_FLAGS)(func)


def train_flags(*names: str) -> Callable[[Command], Command]:
    """Some of the training flags (``lr-preview`` takes the optimizer, schedule and data ones), in this order."""
    return _in_order([TRAIN_FLAGS[name] for name in names])


def _in_order(options: Sequence[Callable[[Command], Command]]) -> Callable[[Command], Command]:
    """One decorator adding ``options`` so that ``--help`` lists them in this order."""

    def decorate(func: Command) -> Command:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def stored_config_options(data_dir: bool) -> Callable[[Command], Command]:
    """``--allow-download`` (and ``--data-dir``) for commands that run a configuration read from a store
    (``reproduce``, ``train --resume``): where it reads and whether it downloads is the user's."""
    options = [click.option("--allow-download", is_flag=True,
                            help="Let a stored configuration's dataset download its files when missing [no].")]
    if data_dir:
        options.insert(0, click.option("--data-dir", type=click.Path(file_okay=False),
                                       help="Where file-based datasets live (never the stored run's) [data]."))
    return _in_order(options)


REFIT_HELP = ("Train the best configuration again on the whole training split (train + validation, every fold with "
              "--cv), score it on the test split and log it with its model as a child run tagged optiflow.role=refit; "
              "a configuration that monitors a val_* metric (early stopping, plateau) keeps its validation split "
              "[refit].")


def stop_options(func: Command) -> Command:
    """``search``'s ``--target`` and ``--budget``, beside ``--n-trials`` and ``--timeout``: whichever comes first."""
    return _in_order([
        click.option("--target", metavar="METRIC=VALUE",
                     help="Stop starting trials once a finished trial reaches VALUE of METRIC (e.g. val_accuracy=0.98: "
                          "at least, or at most for a metric lower is better), in any process sharing --storage; "
                          "METRIC is the objective; a bare VALUE is a value of --metric."),
        click.option("--budget", metavar="TIME", help="Wall time for the search (90s, 30m, 2h, 1h30m): no trial starts "
                                                      "after it, the one in flight finishes; a search that finished no trial exits 1."),
    ])(func)


def dry_run_option(what: str) -> Callable[[Command], Command]:
    return click.option("--dry-run", is_flag=True,
                        help=f"Print the plan ({what}) and an estimate of the total time from one calibration epoch, "
                             "then exit: no MLflow run, no store.")


def not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A name or id the user gave must say something: ``--register ''`` is refused, not taken as absent."""
    if value is not None and not value.strip():
        raise click.BadParameter("must not be empty", ctx=ctx, param=param)
    return value


def model_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--register NAME`` checked by MLflow's own rules for registered model names before anything trains."""
    value = not_empty(ctx, param, value)
    if value is None:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    from optiflow.errors import first_line

    try:
        _validate_model_name(value)
    except MlflowException as exc:
        raise click.BadParameter(first_line(exc.message), ctx=ctx, param=param) from None
    return value


def model_options(register: str, log_models: str | None = None, refit: bool = False) -> Callable[[Command], Command]:
    """What becomes of the models a command trains: ``--log-models`` (``log_models``: whose), ``--refit`` (search)
    and ``--register NAME`` (``register``: which model)."""
    options = [click.option("--register", metavar="NAME", callback=model_name,
                            help=f"Register {register} in MLflow's model registry as the next version of NAME "
                                 "(load it as models:/NAME/VERSION).")]
    if log_models:
        options.append(click.option("--log-models/--no-log-models", default=None,
                                    help=f"Log {log_models} model to MLflow [no]."))
    if refit:
        options.append(click.option("--refit/--no-refit", default=None, help=REFIT_HELP))
    return _in_order(options)


def register(name: str | None, run_id: str | None, tracking_uri: str | None, quiet: bool) -> None:
    """``train --register NAME``: the run's model as the next version of NAME, said unless ``quiet``."""
    if not name or run_id is None:  # data-parallel processes but rank 0 have no run
        return
    from optiflow.commands.train import register_model
    from optiflow.console import print_registered

    version = register_model(run_id, name, tracking_uri)
    if not quiet:
        print_registered(name, version, run_id)


def build_config(params: dict[str, Any], **extra: object) -> RunConfig:
    """The run configuration: defaults < ``--config`` file < flags given on the command line."""
    return resolve_layers(params, {}, **extra)[0]


def resolve_layers(params: dict[str, Any], command_defaults: dict[str, Any],
                   **extra: object) -> tuple[RunConfig, dict[str, Any]]:
    """``(RunConfig, settings)``: a command's own settings (``vary``, ``space`` ...) are read from
    the same ``--config`` file as the run configuration; flags win over the file, the file over
    ``command_defaults``."""
    from optiflow.config import RunConfig, load_yaml

    path = params.get("config_file")
    values = {key_name(k): v for k, v in (load_yaml(path) if path else {}).items()}
    settings = dict(command_defaults)
    settings.update({key: values.pop(key) for key in command_defaults if key in values})
    for key, default in command_defaults.items():
        flag = params.get(key)
        if flag in (None, ()):
            continue
        listed = isinstance(default, tuple)
        settings[key] = [*_as_list(settings[key]), *flag] if listed else flag
    overrides = {
        key: value
        for key, value in params.items()
        if key not in {"config_file", "quiet", "print_config", "dry_run", "nproc", "register", "refit", "allow_download",
                       "reuse", *command_defaults} and value not in (None, ())
    }
    overrides.update(extra)
    return RunConfig.from_dict({**values, **overrides}), settings


def _as_list(value: object) -> list[object]:
    """A repeatable setting from a config file: a list, or one mapping/string."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def print_settings(config: RunConfig, settings: dict[str, Any]) -> None:
    """``--print-config`` for commands with their own settings: one YAML that ``--config`` reads back."""
    import yaml

    click.echo(config.to_yaml(), nl=False)
    click.echo(yaml.safe_dump({k: v for k, v in settings.items() if v not in (None, (), [])}, sort_keys=False), nl=False)
