"""The ``optiflow runs`` click command (thin, like those in cli.py, which registers it on the group)."""

from __future__ import annotations

import click


@click.command()
@click.option("--stale", is_flag=True, required=True,
              help="RUNNING runs whose process is gone (SIGKILL, out of memory, a lost machine).")
@click.option("--close", is_flag=True, help="End each stale run KILLED (its checkpoint stays; --resume still works).")
@click.option("--tracking-uri", help="Store holding the runs [$MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db].")
def runs(stale: bool, close: bool, tracking_uri: str | None) -> None:
    """List the runs of the store that say RUNNING though no process trains them any more.

    A run's process is gone when its heartbeat (tag optiflow.heartbeat) names a pid on this
    host that no longer lives, or, from another host, is older than $OPTIFLOW_STALE_AFTER
    seconds [3600]. Continue one with `optiflow train --resume RUN_ID`.
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
