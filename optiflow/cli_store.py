"""The store-browsing click commands, ``optiflow runs`` and ``optiflow ui`` (thin, like those in cli.py,
which registers them on the group)."""

from __future__ import annotations

import os
import sys

import click


@click.command()
@click.option("--experiment", help="Only the runs of this experiment [every experiment].")
@click.option("--status", type=click.Choice(["RUNNING", "FINISHED", "FAILED", "KILLED", "SCHEDULED"],
                                            case_sensitive=False), help="Only the runs with this status.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1), help="The newest runs shown.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON, every final metric included (for scripts).")
@click.option("--stale", is_flag=True,
              help="Instead: the RUNNING runs whose process is gone (SIGKILL, out of memory, a lost machine).")
@click.option("--close", is_flag=True, help="End each stale run KILLED, a parent with its children (a checkpoint "
              "stays; --resume still works).")
@click.option("--tracking-uri", help="Store holding the runs [$MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db].")
def runs(experiment: str | None, status: str | None, limit: int, as_json: bool, stale: bool, close: bool,
         tracking_uri: str | None) -> None:
    """List the store's runs, newest first: id, name, status and key metrics.

    With --stale, the runs that say RUNNING though no process trains them any more: a run's
    process is gone when its heartbeat (tag optiflow.heartbeat) names a pid on this host that
    no longer lives, or, from another host, is older than $OPTIFLOW_STALE_AFTER seconds [3600];
    a search's or comparison's parent run is stale only once none of its RUNNING children may
    still train. Continue a training with `optiflow train --resume RUN_ID`.
    """
    if not stale:
        if close:
            raise click.UsageError("--close closes stale runs: give it with --stale")
        _list(tracking_uri, experiment, status.upper() if status else None, limit, as_json)
        return
    from optiflow.commands.runs import close_run, stale_runs

    found = stale_runs(tracking_uri)
    for run, reason in found:
        click.echo(f"{run.info.run_id}  {run.info.run_name or ''}  {reason}")
        if close:
            close_run(tracking_uri, run.info.run_id, reason)
    if not found:
        click.echo("no stale runs", err=True)
    elif close:
        click.echo(f"closed {len(found)} run(s) as KILLED", err=True)


def _list(tracking_uri: str | None, experiment: str | None, status: str | None, limit: int, as_json: bool) -> None:
    import json

    from optiflow.commands.runs import KEY_METRICS, list_runs
    from optiflow.console import result_table
    from optiflow.metrics import number
    from optiflow.tracking import resolve_tracking_uri

    records = list_runs(tracking_uri, experiment=experiment, status=status, limit=limit)
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if not records:
        click.echo(f"no runs in {resolve_tracking_uri(tracking_uri)}", err=True)
        return
    shown = [k for k in KEY_METRICS if any(k in r["metrics"] for r in records)]
    rows = [[r["run_id"], r["experiment"], r["name"] or "", r["status"], r["start_time"].replace("T", " ")[:16],
             r["kind"] + (" (child)" if r["parent_run_id"] else ""), *(number(r["metrics"].get(k)) for k in shown)]
            for r in records]
    result_table(f"runs in {resolve_tracking_uri(tracking_uri)} (newest first)",
                 ["run id", "experiment", "name", "status", "started (UTC)", "kind", *shown], rows)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 127.0.0.1 keeps it local, 0.0.0.0 exposes it to the network.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Server worker processes.")
@click.option("--tracking-uri", help="Store to browse [$MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db].")
def ui(host: str, port: int, workers: int, tracking_uri: str | None) -> None:
    """Open the MLflow UI on this project's runs (Ctrl-C stops it); a tracking server's UI is at its own URL."""
    from optiflow.tracking import is_server, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if is_server(uri):
        click.echo(f"MLflow UI: {uri}  (served by the tracking server)", err=True)
        return
    command = _server_command(uri, host, port, workers)
    if host not in LOOPBACK_HOSTS:
        click.echo(f"Warning: --host {host} makes the UI reachable from other machines, without authentication.",
                   err=True)
    click.echo(f"MLflow UI: http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}  (store: {uri})", err=True)
    sys.stderr.flush()
    os.execv(sys.executable, command)


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _server_command(uri: str, host: str, port: int, workers: int) -> list[str]:
    """The ``mlflow ui`` command line serving the store at ``uri`` (a SQLite store's artifacts beside it)."""
    from optiflow.tracking import sqlite_path

    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
               "--workers", str(workers)]
    path = sqlite_path(uri)
    if path is not None:
        command += ["--default-artifact-root", (path.resolve().parent / "artifacts").as_uri()]
    return command
