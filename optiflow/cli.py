"""The ``optiflow`` command line: parse flags, build a configuration, call the core.

Heavy libraries (torch, mlflow, optuna) are imported inside the commands so that
``optiflow --help`` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from optiflow import drawing, flags, tracking
from optiflow.cli_predict import export, predict
from optiflow.cli_store import runs, ui
from optiflow.errors import OptiflowError, TrainingError, first_line
from optiflow.flags import build_config, print_settings, resolve_layers, train_options
from optiflow.signals import InterruptGuard
from optiflow.stores import quiet_artifact_downloads
from optiflow.values import dashed_name, env_flag

if TYPE_CHECKING:
    from optiflow.config import RunConfig


class OptiflowGroup(click.Group):
    """A click group that turns user errors into one line and a non-zero exit, never a traceback."""

    def main(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        tracking.CLI_ARGS = list(sys.argv[1:] if args is None else args)  # every run's optiflow.command tag
        quiet_artifact_downloads()
        kwargs["standalone_mode"] = False
        try:
            return super().main(args, *rest, **kwargs)
        except OptiflowError as exc:
            _fail(str(exc), exc.exit_code)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt) as exc:
            interrupt = exc.__cause__ if isinstance(exc.__cause__, KeyboardInterrupt) else exc
            _fail(str(interrupt) or "interrupted", getattr(interrupt, "exit_code", 130))
        except Exception as exc:
            if env_flag("OPTIFLOW_TRACEBACK"):
                raise
            notes = " ".join(getattr(exc, "__notes__", []))
            _fail(f"{type(exc).__name__}: {first_line(str(exc)) or 'failed'}" + (f" ({notes})" if notes else ""), 1)
        finally:
            tracking.CLI_ARGS = None  # a Python caller in this process later is not this command

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        """A built-in command, else one a plugin added through ``optiflow_register_commands``."""
        command = super().get_command(ctx, name)
        if command is None:
            from optiflow.plugins import get_plugin_manager

            command = get_plugin_manager().commands(self.commands).get(name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        from optiflow.plugins import get_plugin_manager

        return sorted({*super().list_commands(ctx), *get_plugin_manager().commands(self.commands)})


def _fail(message: str, code: int) -> None:
    """Print ``Error: <first line>`` on stderr and exit with ``code`` (set OPTIFLOW_TRACEBACK=1 to see tracebacks)."""
    from optiflow.distributed import agree, is_main_process

    first = first_line(message) or "failed"
    (error := OptiflowError(first)).exit_code = code
    agree(error, if_expected=True)  # `train` under torchrun, before training: the other processes stop too
    if is_main_process():  # data-parallel workers all hit the same error (or rank 0 names the rank): say it once
        click.echo(f"Error: {first}", err=True)
    sys.exit(code)


@click.group(cls=OptiflowGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="optiflow", message="optiflow %(version)s")
@click.option("--disable-plugin", "disabled_plugins", multiple=True, metavar="NAME", is_eager=True,
              expose_value=False, callback=lambda ctx, param, names: _disable_plugins(names),
              help="Do not load this built-in or installed plugin (repeatable; see `optiflow plugins`).")
def cli() -> None:
    """Train neural networks with the classic techniques as switches, every run tracked in MLflow.

    \b
    optiflow train                                  # MLP on the bundled digits data
    optiflow train --opt sgd:momentum=0.9 --sched step:step_size=5,gamma=0.5
    optiflow list optimizer                         # what can be switched on
    optiflow ui                                     # browse the runs
    """


def _disable_plugins(names: tuple[str, ...]) -> None:
    from optiflow.plugins import disable_plugins

    disable_plugins(names)


@cli.command()
@train_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary, only errors (and, for a reused run, the line naming it).")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration as YAML and exit.")
@click.option("--nproc", type=click.IntRange(1, 1024), help="Data-parallel processes on this machine (DDP through torchrun: gloo on CPU, nccl on CUDA; --batch-size is per process) [1].")
@click.option("--resume", metavar="RUN_ID", callback=flags.not_empty, help="Continue a KILLED or FAILED run from its checkpoint, in the same run.")
@flags.stored_config_options(data_dir=False)
@flags.model_options(register="the run's model")
def train(**params: Any) -> None:
    """Train one model and log the run to MLflow.

    Ctrl-C or SIGTERM ends the run KILLED with a checkpoint of the last completed
    epoch; `optiflow train --resume RUN_ID` continues it.
    """
    from optiflow.distributed import expect_agreement, is_main_process

    expect_agreement()
    config = _resume_config(params) if params["resume"] else build_config(params)
    if params["print_config"]:
        click.echo(config.to_yaml(), nl=False)
        return
    if (params["nproc"] or 1) > 1 and "WORLD_SIZE" not in os.environ:
        _launch_data_parallel(config, params["nproc"])
    if main_process := is_main_process():
        drawing.start_helper()  # it imports matplotlib beside this process's imports, for the run's figures
    from optiflow.commands.train import train_command as run_training
    from optiflow.console import RichReporter, print_summary

    quiet = params["quiet"] or not sys.stdout.isatty() or not main_process
    reporter = None if quiet else RichReporter()
    from optiflow.stored import data_dir_warning

    warn = None if params["quiet"] or params["resume"] else data_dir_warning(config)
    result = run_training(config, reporter=reporter, resume=params["resume"], on_start=warn, reuse=params["reuse"] is not False)
    if main_process:
        print_summary(result, config, quiet=params["quiet"])
    flags.register(params["register"], result.run_id, config.tracking_uri, quiet=params["quiet"])


RESUME_PLACES = {"device", "data_dir", "allow_download"}
RESUME_FLAGS = {"resume", "tracking_uri", "quiet", "print_config", "register", *RESUME_PLACES}


def _resume_config(params: dict[str, Any]) -> RunConfig:
    """The logged configuration of the run to resume; flags that would change what is trained are refused."""
    from optiflow.commands.train import resume_config

    if changed := ", ".join("--" + dashed_name(k) for k, v in sorted(params.items())
                            if k not in RESUME_FLAGS and v not in (None, (), False)):
        raise click.UsageError(f"--resume continues the run exactly as it was configured; drop {changed}")
    return resume_config(params["resume"], params["tracking_uri"], **{k: params[k] for k in RESUME_PLACES})


def _launch_data_parallel(config: RunConfig, nproc: int) -> None:
    """Check the configuration once, then rerun this command in ``nproc`` torchrun processes and exit with their code."""
    from optiflow.distributed import launch, without_nproc
    from optiflow.plan import plan
    from optiflow.plugins import get_registry

    plan(config, get_registry())
    sys.exit(launch(nproc, without_nproc(tracking.CLI_ARGS or [])))


COMPARE_DEFAULTS: dict[str, Any] = {"vary": (), "repeats": 1, "metric": None, "baseline": None, "out": None,
                                     "log_models": False}


@cli.command()
@train_options
@click.option("--vary", multiple=True, metavar="KEY=V1,V2,...",
              help="A setting and the values to compare (repeatable: the grid product); component values keep "
                   "their options, e.g. opt=sgd:momentum=0.9,nesterov=true,adam (or separate with '|').")
@click.option("--repeats", type=click.IntRange(max=10_000), help="Seeds per variant: seed, seed+1, ... [1].")
@click.option("--metric", help="Final metric to rank and chart [test_accuracy, or test_loss for regression].")
@click.option("--baseline", help="Variant the others are tested against (paired t-test over the same seeds), by its "
                                 "label (opt=sgd) or, with one --vary, its value (sgd) [the first variant].")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for the plots and tables [compare/<parent run id>]; "
                                                                 "a folder it creates is git-ignored (a .gitignore of *).")
@flags.model_options(register="the best variant's model (every child's model is then logged)", log_models="each child's")
@click.option("--quiet", "-q", is_flag=True, help="No bars or tables: one plain line per run.")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration as YAML and exit.")
@flags.dry_run_option("the runs and variants")
def compare(**params: Any) -> None:
    """Train one run per variant under one parent MLflow run; plot and tabulate the results.

    \b
    optiflow compare --vary opt=sgd,sgd:momentum=0.9,rmsprop,adam --epochs 10
    optiflow compare --vary opt=sgd,adam --vary lr=0.1,0.01 --repeats 3
    optiflow compare --vary opt=sgd,adam,rmsprop --repeats 5 --baseline sgd

    With --repeats N > 1 each variant's metric gets its mean and 95% t-interval over the N seeds, and
    every other variant a paired t-test against the baseline on the same seeds (* significant at 5%).
    """
    if not (params["print_config"] or params["dry_run"]):
        drawing.start_helper()  # as train's
    from optiflow.commands import compare as command

    config, settings = resolve_layers(params, COMPARE_DEFAULTS)
    vary = command.parse_vary(settings["vary"])
    if params["print_config"]:
        return print_settings(config, {**settings, "vary": {k: "|".join(v) for k, v in vary.items()}})
    from optiflow.commands.dry_run import compare_forecast
    from optiflow.console import WorkProgress, print_comparison, print_forecast

    if params["dry_run"]:
        return print_forecast(compare_forecast(config, vary, int(settings["repeats"]), settings["metric"],
                                               log_models=bool(settings["log_models"]) or bool(params["register"]),
                                               reuse=params["reuse"] is not False))
    quiet = params["quiet"]
    with InterruptGuard(), WorkProgress("runs", quiet) as progress:  # SIGINT/SIGTERM between runs too
        result = command.compare(config, vary, repeats=int(settings["repeats"]), metric=settings["metric"],
                                 baseline=settings["baseline"], out_dir=settings["out"],
                                 log_models=bool(settings["log_models"]), reuse=params["reuse"] is not False,
                                 announce=progress.announce, reporter_factory=progress.reporter, progress=progress,
                                 register=params["register"])
    if not quiet:
        print_comparison(result, config)
    if result.failure:
        raise TrainingError(result.failure)


@cli.command()
@train_options
@click.option("--space", multiple=True, metavar="NAME=SPEC",
              help="A searched setting (repeatable): lr=loguniform:1e-4:1e-1, opt=choice:sgd,adam, "
                   "hidden=int:32:256, dropout=float:0:0.5[:STEP], opt.momentum=uniform:0:0.99; or a YAML file.")
@click.option("--sampler", metavar="NAME[:key=value,...]",
              help="grid, random, tpe, gp (Bayesian), cmaes or nsga2 (genetic), with Optuna options [tpe].")
@click.option("--sampler-seed", type=int, help="Seed of the sampler [unseeded].")
@click.option("--pruner", metavar="NAME[:key=value,...]",
              help="none, median, hyperband or successive-halving, fed each epoch's metric [none].")
@click.option("--metric", help="Objective: a metric of the runs, e.g. val_accuracy [val_loss].")
@click.option("--direction", type=click.Choice(["minimize", "maximize"]),
              help="Whether to minimize or maximize the metric [maximize for accuracy/r2, else minimize].")
@click.option("--n-trials", type=click.IntRange(max=10**9), help="Finished trials the study should hold, across "
                                                              "every process sharing --storage [20; the whole grid for grid].")
@click.option("--timeout", type=float, help="Stop starting trials after this many seconds.")
@flags.stop_options
@click.option("--cv", type=click.IntRange(max=1000), help="Score each trial by K-fold cross-validation on the training split.")
@click.option("--storage", help="Optuna storage shared by processes: sqlite:///study.db, postgresql://..., "
                                "journal:study.log [in memory].")
@click.option("--study-name", help="Study to create or join in --storage [a new name].")
@click.option("--n-jobs", type=click.IntRange(max=1024), help="Processes running trials in parallel [1].")
@click.option("--heartbeat", type=int, help="Seconds between trial heartbeats on an RDB --storage; a trial silent "
                                            "for twice that is failed, its run ended KILLED, and retried once [15].")
@flags.model_options(register="the refit model", log_models="each trial's", refit=True)
@click.option("--child-artifacts", is_flag=True, default=None,
              help="Trial and fold runs log figures and config files too [no: params and metrics; the parent "
                   "holds the plots].")
@click.option("--quiet", "-q", is_flag=True, help="No bars, tables or notes: one plain line per trial.")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration as YAML and exit.")
@flags.dry_run_option("the trials, the space and the stops")
def search(**params: Any) -> None:
    """Search hyper-parameters with Optuna: a parent MLflow run per study, a child run per trial.

    \b
    optiflow search --space lr=loguniform:1e-4:1e-1 --space opt=choice:sgd,adam --n-trials 30
    optiflow search --space hidden=int:32:256 --sampler random --pruner median --cv 5
    optiflow search --space lr=loguniform:1e-4:1e-1 --storage sqlite:///study.db --study-name s1  # many processes
    """
    if not (params["print_config"] or params["dry_run"]):
        drawing.start_helper()  # as train's
    from optiflow.commands import search as command

    config, values = resolve_layers(params, command.given_defaults())
    settings = command.settings_from({**values, "refit": params["refit"], "register": params["register"], "reuse": params["reuse"]}, config)
    if params["print_config"]:
        return print_settings(config, {**values, "space": {d.name: command.describe_dimension(d) for d in settings.space}})
    from optiflow.commands.dry_run import search_forecast
    from optiflow.console import WorkProgress, print_forecast, print_search

    if params["dry_run"]:
        return print_forecast(search_forecast(config, settings))
    with InterruptGuard(), WorkProgress("trials", params["quiet"]) as progress:  # as compare: between trials, folds
        result = command.search(config, settings, progress=progress)
    if not params["quiet"]:
        print_search(result, config)
    if result.failure:
        raise TrainingError(result.failure)


@cli.command()
@click.argument("run_id")
@click.option("--tracking-uri", help="Store holding the run [$MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db].")
@click.option("--device", help="Train on this device instead of the logged one (auto, cpu, cuda).")
@click.option("--rtol", type=float, default=1e-5, show_default=True, help="Relative tolerance per metric.")
@click.option("--atol", type=float, default=1e-8, show_default=True, help="Absolute tolerance per metric.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or table; the exit code tells.")
@flags.stored_config_options(data_dir=True)
def reproduce(run_id: str, tracking_uri: str | None, device: str | None, rtol: float, atol: float,
              quiet: bool, **places: Any) -> None:
    """Re-run RUN_ID from its logged config.yaml (same seed) and check its metrics and final weights.

    Reports whether the final weights are identical bit for bit (their SHA-256), else the largest weight
    and metric differences.  Exits 1 when a metric differs beyond the tolerance (timing metrics are not
    compared), when the data differ, or when a --deterministic run on the same kind of device does not
    give the same weights bit for bit.
    """
    from optiflow.commands.reproduce import reproduce as run_reproduction
    from optiflow.console import RichReporter, print_reproduction

    result = run_reproduction(run_id, tracking_uri, device=device, rtol=rtol, atol=atol,
                              reporter=None if quiet or not sys.stdout.isatty() else RichReporter(), **places)
    if not quiet:
        print_reproduction(result)
    result.check()


@cli.command("lr-preview")
@flags.train_flags("config_file", "sched", "opt", "lr", "epochs", "batch_size", "data")
@click.option("--steps-per-epoch", type=int, help="Steps per epoch, instead of counting the data's batches.")
@click.option("--out", type=click.Path(dir_okay=False), default="lr-schedule.png", show_default=True,
              help="Where to save the plot.")
def lr_preview(**params: Any) -> None:
    """Plot the learning-rate schedule (warmup shaded) and print it per epoch, without training.

    The steps per epoch are the batches of the data's training split (or --steps-per-epoch).
    """
    from optiflow.commands.lr_preview import preview
    from optiflow.console import print_lr_preview
    from optiflow.plots import lr_schedule

    steps, out = params.pop("steps_per_epoch"), params.pop("out")
    config = build_config(params)
    result = preview(config, steps)
    figure = lr_schedule(result.positions, result.rates, title=f"{config.opt} / {config.sched}",
                         warmup_end=result.warmup_end)
    try:
        figure.savefig(out, dpi=110)
    except OSError as exc:
        raise OptiflowError(f"cannot write {out}: {exc.strerror}") from None
    except ValueError as exc:  # a suffix matplotlib cannot write (.txt)
        raise OptiflowError(f"cannot write {out}: {first_line(exc)}") from None
    print_lr_preview(result, out)


@cli.command("list")
@click.argument("kind", required=False)
@click.option("--pattern", default="*", help="Only names matching this glob, e.g. 'adam*'.")
@click.option("--json", "as_json", is_flag=True, help="Print the components as JSON (for scripts).")
def list_components(kind: str | None, pattern: str, as_json: bool) -> None:
    """List registered components: all, one family (data, model, optimizer, regularizer,
    scheduler, initializer) or one kind (dataset, normalizer, augmentation, activation, loss).

    One line per component when the output is not a terminal (for grep)."""
    from optiflow.console import component_table
    from optiflow.listing import component_records, kinds_named
    from optiflow.plugins import get_registry

    registry = get_registry()
    components = [c for k in kinds_named(kind) for c in registry.select(k, pattern)]
    if as_json:
        click.echo(json.dumps(component_records(components), indent=2, default=str))
        return
    component_table(components)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the plugins as JSON (for scripts).")
def plugins(as_json: bool) -> None:
    """List plugins: distribution and version, status, the hooks each implements and what it registered.

    Failed and blocked plugins are listed too.  OPTIFLOW_LOAD_PLUGINS, OPTIFLOW_DISABLE_PLUGINS,
    --disable-plugin and OPTIFLOW_STRICT_PLUGINS control loading; see docs/plugins.md.
    """
    from optiflow.plugins import describe_plugins

    rows = describe_plugins(reserved=cli.commands)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from optiflow.console import plugin_table

    plugin_table(rows)


for _command in (predict, export, runs, ui):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by MLflow's import, overriding levels set before
    from optiflow.host import exit_process, scan_imported_objects_once

    scan_imported_objects_once()
    try:
        cli(prog_name="optiflow")
    except SystemExit as exc:
        exit_process(exc.code)  # the command's work is written: skip the interpreter's teardown (0.5-0.9 s)
    exit_process(0)


if __name__ == "__main__":  # python -m optiflow.cli, as python -m optiflow
    main()
