"""Terminal output with rich: progress bars, summary and listing tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

if TYPE_CHECKING:
    from optiflow.commands.compare import Comparison
    from optiflow.commands.lr_preview import SchedulePreview
    from optiflow.commands.predict import Predictions
    from optiflow.commands.reproduce import Reproduction, WeightsCheck
    from optiflow.config import RunConfig
    from optiflow.forecast import Forecast, Tick
    from optiflow.registry import Component, Option
    from optiflow.run import RunResult
    from optiflow.search.summary import SearchResult


class PipeFriendlyConsole(Console):
    """Word-wraps for a terminal; into a pipe or file never wraps a line, so a name or id stays whole on it.

    Markup is off: what it prints holds user text (specs such as ``opt=[sam:base=[sgd]]``, names, paths) that
    rich would otherwise read as tags and drop; styled text is built with :func:`styled`, its user parts escaped.
    """

    def print(self, *objects: object, **options: Any) -> None:
        if not self.is_terminal:
            options.setdefault("soft_wrap", True)
        super().print(*objects, **options)


console = PipeFriendlyConsole(markup=False)


def styled(markup: str) -> Text:
    """``markup`` (rich tags such as ``[red]...[/red]``) as styled text: interpolate user text with ``escape``."""
    return Text.from_markup(markup)


def _bars(transient: bool = False) -> Progress:
    """Bars whose description and info are plain text (a run's name holds specs such as ``opt=[sgd:...]``)."""
    return Progress(TextColumn("{task.description}", style="bold", markup=False,
                               table_column=Column(no_wrap=True)),
                    BarColumn(bar_width=12, table_column=Column(no_wrap=True)),
                    MofNCompleteColumn(table_column=Column(no_wrap=True)),
                    # the info alone gives way on a narrow terminal, cut short at its end (the best's parameters)
                    TextColumn("{task.fields[info]}", markup=False,
                               table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                    TimeElapsedColumn(table_column=Column(no_wrap=True)), console=console, transient=transient,
                    expand=True)


class RichReporter:
    """Progress over epochs and over the batches of the current epoch (inside ``shared``'s display when given:
    its bars go when the training ends)."""

    def __init__(self, shared: Progress | None = None) -> None:
        self.shared = shared
        self.progress = shared or _bars()
        self.epochs = self.batches = TaskID(-1)

    def start(self, epochs: int, batches: int) -> None:
        if self.shared is None:
            self.progress.start()
        self.epochs = self.progress.add_task("epochs", total=epochs, info="")
        self.batches = self.progress.add_task("batches", total=batches, info="")

    def batch(self) -> None:
        self.progress.advance(self.batches)

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        shown = {k: metrics[k] for k in ("train_loss", "val_loss", "val_accuracy", "val_rmse") if k in metrics}
        info = "  ".join(f"{k}={v:.4g}" for k, v in shown.items())
        self.progress.update(self.epochs, completed=epoch, info=info)
        self.progress.reset(self.batches, info="")

    def stop(self) -> None:
        if self.shared is None:
            self.progress.stop()
            return
        for task in (self.epochs, self.batches):
            if task in self.progress.task_ids:
                self.progress.remove_task(task)


class WorkProgress:
    """The progress of a search or a comparison: on a terminal one live bar (units done of the total, the last
    unit's time, the best so far, the ETA) with each training's epoch bars under it; piped or ``quiet``, one plain
    line per finished unit (a :class:`~optiflow.forecast.Tick`), no bars.  Other lines (str) show unless quiet."""

    def __init__(self, unit: str, quiet: bool) -> None:
        self.quiet = quiet
        self.live = not quiet and console.is_terminal
        self.bars = _bars() if self.live else None
        self.task = self.bars.add_task(unit, total=None, info="") if self.bars else None

    def __enter__(self) -> WorkProgress:
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()

    def __call__(self, item: str | Tick) -> None:
        if isinstance(item, str):
            if not self.quiet:
                console.print(item)
        elif self.bars is not None and self.task is not None:
            self.bars.update(self.task, total=item.total, completed=item.done, info=item.status(best_last=True))
        else:
            console.print(item.line(), markup=False, soft_wrap=True)

    def announce(self, index: int, total: int, name: str, _config: object) -> None:
        """Before a comparison's run: its name on the bar, or a line ``[i/N] name`` in a pipe (none when quiet)."""
        if self.bars is not None and self.task is not None:
            self.bars.update(self.task, total=total, description=f"runs: {name}")
        elif not self.quiet:
            console.print(styled(f"[bold]\\[{index}/{total}][/bold] {escape(name)}"))

    def reporter(self) -> RichReporter | None:
        """Each training's epoch and batch bars, inside this display (none in a pipe)."""
        return RichReporter(self.bars) if self.bars is not None else None


def print_forecast(forecast: Forecast) -> None:
    """``--dry-run``: the plan, the calibration and the estimated total time."""
    from optiflow.values import duration_text

    for line in forecast.lines:
        console.print(line, markup=False, soft_wrap=True)
    cal = forecast.calibration
    console.print(f"calibration (one epoch, nothing logged): setup {cal.setup_seconds:.2f} s, epoch "
                  f"{cal.epoch_seconds:.2f} s, test {cal.test_seconds:.2f} s", markup=False)
    console.print(f"estimated total: {duration_text(forecast.estimate)} ({forecast.basis})", markup=False,
                  soft_wrap=True)
    for warning in forecast.warnings:
        console.print(f"warning: {warning}", markup=False, soft_wrap=True)


def print_summary(result: RunResult, config: RunConfig, quiet: bool = False) -> None:
    """The final table: test metrics, epochs, time, the MLflow run and how to open the UI; ``quiet``: nothing,
    but for a reused run the line naming it (it is the result)."""
    from optiflow.errors import redact
    from optiflow.tracking import ui_command

    if quiet:
        if result.reused:
            console.print(f"reused run {result.run_id}: a finished run with the same content key (--no-reuse trains "
                          f"anew)", markup=False, soft_wrap=True)
        return
    title = "optiflow run (reused: a finished run with the same content key; --no-reuse trains anew)" \
        if result.reused else "optiflow run"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in sorted(result.metrics.items()):
        table.add_row(key, f"{value:.4f}")
    table.add_row("epochs", f"{result.epochs}/{config.epochs}" + (f" ({result.stop_reason})" if result.stop_reason else ""))
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("mlflow run", str(result.run_id))
    table.add_row("experiment", config.experiment)
    if result.tracking_uri is not None:  # None: a data-parallel process that logs nothing
        table.add_row("tracking store", redact(result.tracking_uri))
        table.add_row("open the UI", ui_command(result.tracking_uri))
    print_table(table)


def component_table(components: list[Component]) -> None:
    """One row per component; names never wrap.  Not on a terminal: one line per component (for grep)."""
    columns = ["kind", "name", "options", "description", "plugin"]
    rows = [[c.kind, c.name + (f" ({', '.join(c.aliases)})" if c.aliases else ""),
             ", ".join(_option_cell(o) for o in c.options), c.description, c.plugin] for c in components]
    _print_rows(columns, rows, no_wrap=("kind", "name", "plugin"))


def _option_cell(option: Option) -> str:
    """``momentum=0.9``; an option that is a component says so: ``base=sgd (optimizer spec)``."""
    return f"{option.name}={option.default}" + (f" ({option.type_name})" if option.component_kind else "")


def plugin_table(rows: list[dict[str, Any]]) -> None:
    """One row per plugin: origin, status, hooks and what it registered (components per kind, commands)."""
    columns = ["name", "distribution", "version", "status", "hooks (optiflow_...)", "registered"]
    cells = []
    for row in rows:
        registered = [f"{kind}: {', '.join(names)}" for kind, names in row["components"].items()]
        if row["commands"]:
            registered.append(f"commands: {', '.join(row['commands'])}")
        status = row["status"] if not row["error"] else f"{row['status']}: {row['error']}"
        cells.append([row["name"], row["distribution"], str(row["version"]), status,
                      "\n".join(h.removeprefix("optiflow_") for h in row["hooks"]), "\n".join(registered)])
    if console.is_terminal:  # the distribution under the name leaves an 80-column terminal room for whole names
        cells = [[f"{name}\n{distribution} {version}", *rest] for name, distribution, version, *rest in cells]
        columns = ["plugin", *columns[3:]]
    _print_rows(columns, cells, no_wrap=("name", "plugin", "hooks (optiflow_...)"),
                joins={"hooks (optiflow_...)": ", ", "registered": "; "})


def _print_rows(columns: list[str], rows: list[list[str]], no_wrap: tuple[str, ...],
                joins: dict[str, str] | None = None) -> None:
    """A table on a terminal, the ``no_wrap`` columns never wrapped.  Piped: aligned plain lines, one per row and
    nothing cut, so ``grep`` finds whole rows (a cell's lines joined by ``joins[column]``, else a space)."""
    if console.is_terminal:
        table = Table()
        for column in columns:
            table.add_column(column, no_wrap=column in no_wrap, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    joins = joins or {}
    lines = [columns] + [[" ".join(joins.get(column, " ").join(cell.splitlines()).split())
                          for column, cell in zip(columns, row)] for row in rows]
    widths = [max(len(line[index]) for line in lines) for index in range(len(columns) - 1)]
    for line in lines:
        print("  ".join([cell.ljust(width) for cell, width in zip(line, widths)] + line[-1:]).rstrip())


def result_table(title: str, columns: list[str], rows: Sequence[Sequence[object]]) -> None:
    """A table of results (compare summary, search trials, reproduction check): cells as plain text (no markup),
    a :class:`~rich.text.Text` cell keeps its style."""
    table = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        table.add_column(column, overflow="fold", no_wrap=index == 0)
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else str(cell) for cell in row))
    print_table(table)


def print_table(table: Table) -> None:
    """``table`` as wide as the terminal; into a pipe as wide as it needs, so that no cell is folded."""
    from rich.measure import Measurement

    if console.is_terminal:
        console.print(table)
        return
    before = console.width  # piped: as wide as the table needs, no cell folded
    console.width = max(before, Measurement.get(console, console.options.update_width(10_000), table).maximum)
    try:
        console.print(table)
    finally:
        console.width = before


def print_comparison(result: Comparison, config: RunConfig) -> None:
    """The summary of ``compare``: one row per variant, then where the plots went."""
    from optiflow.commands.compare import BRIEF_COLUMNS
    from optiflow.tracking import resolve_tracking_uri, ui_command

    result_table(f"compare: final {result.metric}", list(BRIEF_COLUMNS), result.brief)
    if result.note:
        console.print(result.note)
    print_reused(result.reused, len(result.children), "runs")
    console.print(f"parent run {result.parent_run_id}  ·  files in {result.out_dir}  ·  "
                  f"open the UI: {ui_command(resolve_tracking_uri(config.tracking_uri))}")
    if result.registered is not None:
        print_registered(*result.registered)


def print_search(result: SearchResult, config: RunConfig, top: int = 10) -> None:
    """The best trials of the study, the best parameters and the parent run."""
    from optiflow.tracking import resolve_tracking_uri, ui_command

    counts = ", ".join(f"{n} {state.lower()}" for state, n in result.counts.items() if n)
    if result.rows:
        result_table(f"study {result.study_name}: {counts}", result.columns[:-2], [r[:-2] for r in result.rows[:top]])
    else:
        console.print(f"study {result.study_name}: no trial finished", markup=False, soft_wrap=True)
    print_reused(result.reused, sum(result.counts.values()), "trials")
    if result.best_value is not None:
        shown = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
        console.print(f"best {result.best_value:.4g}: {shown}")
    refit = result.refit
    if refit is not None and refit.run_id is not None:
        scores = "  ".join(f"{k}={v:.4f}" for k, v in sorted(refit.metrics.items()))
        split = f"validation split {refit.val_split:g} kept" if refit.val_split else "train + validation"
        console.print(f"refit of trial {refit.trial} on {split}: {scores}  ·  run {refit.run_id}",
                      soft_wrap=True)
    if refit is not None and refit.failure:
        console.print(f"refit of trial {refit.trial} failed: {refit.failure}", soft_wrap=True)
    if result.stop is not None:
        console.print(f"stopped ({result.stop.reason}): {result.stop.detail}", soft_wrap=True)
    console.print(f"parent run {result.parent_run_id}  ·  open the UI: "
                  f"{ui_command(resolve_tracking_uri(config.tracking_uri))}")
    if refit is not None and refit.registered is not None:
        print_registered(refit.registered[0], refit.registered[1], refit.run_id)


def print_reused(reused: int, total: int, what: str) -> None:
    """``reused N of M runs``: how many finished runs of the same content key a command took instead of training."""
    if reused:
        console.print(f"reused {reused} of {total} {what}: finished runs with the same content key, not trained "
                      "again (--no-reuse trains them anew)", soft_wrap=True)


def print_registered(name: str, version: str, run_id: str | None) -> None:
    """Where ``--register`` put the model: its registered name and version, and the URI that loads it."""
    console.print(f"registered the model of run {run_id} as '{name}' version {version}: models:/{name}/{version}",
                  soft_wrap=True)


def print_reproduction(result: Reproduction) -> None:
    """Metric by metric: the original value, the reproduced one and whether they match."""
    rows = [[key, "-" if a is None else f"{a:.6g}", "-" if b is None else f"{b:.6g}",
             "-" if a is None or b is None else f"{abs(a - b):.2g}", "yes" if same else styled("[red]NO[/red]")]
            for key, a, b, same in result.rows]
    note = "" if result.original_status == "FINISHED" else f" (the original ended {result.original_status})"
    result_table(f"reproduce {result.original_run_id}{note}", ["metric", "original", "reproduced", "|diff|", "match"],
                 rows)
    metric, difference = result.largest_metric_difference()
    verdict = "[green]all metrics match[/green]" if result.metrics_match else "[red]metrics differ[/red]"
    if metric is not None:
        verdict += f" (largest difference: {escape(metric)} by {difference:.3g})" if difference else " (all identical)"
    console.print(styled(f"{verdict}  ·  new run {escape(str(result.run_id))}"))
    if result.weights is not None:
        console.print(styled(weights_verdict(result.weights)))


def weights_verdict(check: WeightsCheck) -> str:
    """One line on the final weights (rich markup, user text escaped): identical bit for bit, or how far apart and
    whether that was promised."""
    data = "" if check.same_data is not False else "; [red]the data differ (another data hash)[/red]"
    if check.original is None:
        return f"weights: the original logged no weights hash (an older run){data}"
    if check.identical:
        return f"[green]weights identical bit for bit[/green] (sha256 {check.original[:12]}){data}"
    largest = ""
    if check.largest is not None:
        largest = f", largest difference {check.largest[1]:.3g} in {escape(str(check.largest[0]))}"
    else:
        largest = " (the original logged no model to compare them with)"
    if check.bit_for_bit:
        return f"[red]weights differ[/red]{largest}, although both ran --deterministic on the same device{data}"
    return (f"weights differ{largest}; bit-for-bit identity is promised only with --deterministic on the same "
            f"kind of device{data}")


def print_lr_preview(result: SchedulePreview, out: str | Path) -> None:
    """The learning rate per epoch (start, lowest, highest) and where the plot went."""
    rows = [[str(epoch), f"{start:.4g}", f"{low:.4g}", f"{high:.4g}"] for epoch, start, low, high in result.per_epoch()]
    length = result.length
    title = f"learning rate: {length.epochs} epochs x {length.steps_per_epoch} steps"
    if result.warmup_end is not None:
        title += f", warmup until epoch {result.warmup_end:.2f}"
    if result.monitor:
        title += f" ('{result.monitor}' assumed never to improve)"
    result_table(title, ["epoch", "lr at start", "lowest", "highest"], rows)
    console.print(f"plot saved to {out}")


def print_predictions(result: Predictions, out: str | Path | None, rows: int = 10, max_probabilities: int = 5) -> None:
    """The first predictions (with the true label when the input had one), the score and where the CSV went."""
    table = result.table
    probabilities = [c for c in table.columns if c.startswith("prob_")]
    columns = ["id", *(c for c in table.columns if c.startswith("prediction"))]
    columns += probabilities if len(probabilities) <= max_probabilities else []
    head = table.head(rows)
    cells = [[_cell(v) for v in row] for row in head[columns].itertuples(index=False)]
    if len(probabilities) > max_probabilities:
        columns.append("probability")
        for row, best in zip(cells, head[probabilities].max(axis=1)):
            row.append(_cell(best))
    if result.labels is not None:
        columns.insert(1, "label")
        for row, label in zip(cells, result.labels):
            row.insert(1, _cell(label))
    result_table("predictions", columns, cells)
    if result.score is not None:
        score = result.score
        console.print(f"{score.name} {score.value:.4f} on {score.rows} labelled rows")
    total, model = len(table), result.model_uri
    if out is not None:
        console.print(f"{total} predictions of {model} written to {out}")
    elif total > rows:
        console.print(f"first {rows} of {total} predictions of {model}; --output FILE writes them all")
    else:
        console.print(f"{total} predictions of {model}")


def _cell(value: object) -> str:
    """A value as table text: a non-integer number to 4 significant decimals, a missing label as '-'."""
    import numbers

    if value is None:
        return "-"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{value:.4f}"
    return str(value)
