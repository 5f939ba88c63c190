"""The store-browsing click commands, ``optiflow runs`` and ``optiflow ui`` (thin, like those in cli.py,
which registers them on the group)."""

from __future__ import annotations

import os
import sys

import click


@click.command()
@click.option("--stale", is_flag=True, required=True,
              help="RUNNING runs whose process is gone (SIGKILL, out of memory, a lost machine).")
@click.option("--close", is_flag=True, help="End each stale run KILLED, a parent with its children (a checkpoint "
              "stays; --resume still works).")
@click.option("--tracking-uri", help="Store holding the runs [$MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db].")
def runs(stale: bool, close: bool, tracking_uri: str | None) -> None:
    """List the runs of the store that say RUNNING though no process trains them any more.

    A run's process is gone when its heartbeat (tag optiflow.heartbeat) names a pid on this
    host that no longer lives, or, from another host, is older than $OPTIFLOW_STALE_AFTER
    seconds [3600]; a search's or comparison's parent run is stale only once none of its
    RUNNING children may still train. Continue a training with `optiflow train --resume RUN_ID`.
    """
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


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 127.0.0.1 keeps it local, 0.0.0.0 exposes it to the network.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Server worker processes.")
@click.option("--tracking-uri", help="Store to browse [$MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db].")
def ui(host: str, port: int, workers: int, tracking_uri: str | None) -> None:
    """Open the MLflow UI on this project's runs (Ctrl-C stops it); a tracking server's UI is at its own URL."""
    from optiflow.tracking import is_server, resolve_tracking_uri, ui_server_command

    uri = resolve_tracking_uri(tracking_uri)
    if is_server(uri):
        click.echo(f"MLflow UI: {uri}  (served by the tracking server)", err=True)
        return
    command = ui_server_command(uri, host, port, workers)
    if host not in LOOPBACK_HOSTS:
        click.echo(f"Warning: --host {host} makes the UI reachable from other machines, without authentication.",
                   err=True)
    click.echo(f"MLflow UI: http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}  (store: {uri})", err=True)
    sys.stderr.flush()
    os.execv(sys.executable, command)


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
