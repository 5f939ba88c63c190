"""`optiflow runs` lists the store's runs (id, name, status, key metrics), filtered by experiment and status."""

from __future__ import annotations

import json

from helpers import runs_of

TINY = ("--epochs", "1", "--model", "mlp:hidden=[8]", "--batch-size", "64", "-q")


def test_runs_lists_filters_and_prints_json(invoke, mlflow_client, experiment, tracking_uri):
    assert invoke("train", "--run-name", "first-run", *TINY).exit_code == 0
    assert invoke("train", "--run-name", "diverges", "--opt", "sgd", "--lr", "1e30", *TINY).exit_code == 1
    finished, failed = sorted(runs_of(mlflow_client, experiment), key=lambda r: r.info.status, reverse=True)
    result = invoke("runs", "--tracking-uri", tracking_uri, "--experiment", experiment, store=False)
    assert result.exit_code == 0, result.stderr
    lines = result.output.splitlines()
    [row] = [line for line in lines if finished.info.run_id in line]
    assert "first-run" in row and "FINISHED" in row and f"{finished.data.metrics['test_accuracy']:.4f}" in row
    assert any(failed.info.run_id in line and "FAILED" in line for line in lines)
    assert lines.index(next(line for line in lines if failed.info.run_id in line)) < lines.index(row), "newest first"

    result = invoke("runs", "--tracking-uri", tracking_uri, "--experiment", experiment, "--status", "failed", "--json",
                    store=False)
    assert result.exit_code == 0, result.stderr
    [record] = json.loads(result.output)
    assert record["run_id"] == failed.info.run_id and record["status"] == "FAILED" and record["name"] == "diverges"
    assert record["experiment"] == experiment and record["kind"] == "train" and record["parent_run_id"] is None


def test_runs_refuses_an_unknown_experiment_and_a_lone_close(invoke, tracking_uri, experiment):
    assert invoke("train", *TINY).exit_code == 0
    result = invoke("runs", "--tracking-uri", tracking_uri, "--experiment", experiment + "x", store=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"no experiment '{experiment}x'" in result.stderr and f"(did you mean '{experiment}'?)" in result.stderr
    result = invoke("runs", "--close", "--tracking-uri", tracking_uri, store=False)
    assert result.exit_code == 2 and "--close closes stale runs: give it with --stale" in result.stderr


def test_runs_stale_still_lists_only_stale_runs(invoke, tracking_uri):
    result = invoke("runs", "--stale", "--tracking-uri", tracking_uri, store=False)
    assert result.exit_code == 0 and "run id" not in result.output


def test_a_mistyped_store_is_refused_and_nothing_is_created(tmp_path):
    """Listing reads: a --tracking-uri naming no store is one line, exit 2, and creates no folder or database."""
    from helpers import run_cli

    missing = tmp_path / "nowhere" / "x.db"
    for argv in (["runs"], ["runs", "--stale"], ["predict", "abc", "--input", str(tmp_path)]):
        result = run_cli(*argv, "--tracking-uri", f"sqlite:///{missing}", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == f"Error: no tracking store at {missing}: check --tracking-uri " \
                                        "(or $MLFLOW_TRACKING_URI)", result.stderr
    assert not (tmp_path / "nowhere").exists()
