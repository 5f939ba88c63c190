"""Terminal output with rich: progress bars, summary and listing tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()


class RichReporter:
    """Progress over epochs and over the batches of the current epoch."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=False,
        )
        self.epochs = self.batches = TaskID(-1)

    def start(self, epochs: int, batches: int) -> None:
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
        self.progress.stop()


def print_summary(result: Any, config: Any, quiet: bool = False) -> None:
    """The final table: test metrics, epochs, time, the MLflow run and how to open the UI."""
    from optiflow.tracking import ui_command

    if quiet:
        return
    table = Table(title="optiflow run", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in sorted(result.metrics.items()):
        table.add_row(key, f"{value:.4f}")
    table.add_row("epochs", f"{result.epochs}/{config.epochs}" + (f" ({result.stop_reason})" if result.stop_reason else ""))
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("mlflow run", str(result.run_id))
    table.add_row("experiment", config.experiment)
    table.add_row("open the UI", ui_command(result.tracking_uri))
    console.print(table)


def component_table(components: list[Any]) -> None:
    table = Table(show_lines=False)
    for column in ("kind", "name", "options", "description", "plugin"):
        table.add_column(column, overflow="fold")
    for c in components:
        options = ", ".join(f"{o.name}={o.default}" for o in c.options)
        table.add_row(c.kind, c.name + (f" ({', '.join(c.aliases)})" if c.aliases else ""), options, c.description, c.plugin)
    console.print(table)


def plugin_table(rows: list[dict[str, Any]]) -> None:
    """One row per plugin: origin, status, hooks and what it registered (components per kind, commands)."""
    table = Table()
    table.add_column("name", overflow="fold")
    table.add_column("distribution", no_wrap=True)
    table.add_column("status", overflow="fold")
    table.add_column("hooks (optiflow_...)", no_wrap=True)
    table.add_column("registered", overflow="fold")
    for row in rows:
        registered = [f"{kind}: {', '.join(names)}" for kind, names in row["components"].items()]
        if row["commands"]:
            registered.append(f"commands: {', '.join(row['commands'])}")
        status = row["status"] if not row["error"] else f"{row['status']}: {row['error']}"
        table.add_row(row["name"], f"{row['distribution']}\n{row['version']}", status, "\n".join(h.removeprefix("optiflow_") for h in row["hooks"]),
                      "\n".join(registered))
    console.print(table)


def result_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A table of results (compare summary, search trials, reproduction check)."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*map(str, row))
    console.print(table)


def print_comparison(result: Any, config: Any) -> None:
    """The summary of ``compare``: one row per variant, then where the plots went."""
    from optiflow.commands.compare import BRIEF_COLUMNS
    from optiflow.tracking import resolve_tracking_uri, ui_command

    result_table(f"compare: final {result.metric}", list(BRIEF_COLUMNS), result.brief)
    console.print(f"parent run {result.parent_run_id}  ·  files in {result.out_dir}  ·  "
                  f"open the UI: {ui_command(resolve_tracking_uri(config.tracking_uri))}")


def print_search(result: Any, config: Any, top: int = 10) -> None:
    """The best trials of the study, the best parameters and the parent run."""
    from optiflow.tracking import resolve_tracking_uri, ui_command

    counts = ", ".join(f"{n} {state.lower()}" for state, n in result.counts.items() if n)
    result_table(f"study {result.study_name}: {counts}", result.columns[:-1], [r[:-1] for r in result.rows[:top]])
    if result.best_value is not None:
        shown = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
        console.print(f"best {result.best_value:.4g}: {shown}")
    console.print(f"parent run {result.parent_run_id}  ·  open the UI: "
                  f"{ui_command(resolve_tracking_uri(config.tracking_uri))}")


def print_reproduction(result: Any) -> None:
    """Metric by metric: the original value, the reproduced one and whether they match."""
    rows = [[key, "-" if a is None else f"{a:.6g}", "-" if b is None else f"{b:.6g}",
             "-" if a is None or b is None else f"{abs(a - b):.2g}", "yes" if same else "[red]NO[/red]"]
            for key, a, b, same in result.rows]
    note = "" if result.original_status == "FINISHED" else f" (the original ended {result.original_status})"
    result_table(f"reproduce {result.original_run_id}{note}", ["metric", "original", "reproduced", "|diff|", "match"],
                 rows)
    verdict = "[green]all metrics match[/green]" if result.matches else "[red]metrics differ[/red]"
    console.print(f"{verdict}  ·  new run {result.run_id}")


def print_lr_preview(result: Any, out: Any) -> None:
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
