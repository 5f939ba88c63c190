"""`optiflow reproduce` re-runs a logged configuration and compares its metrics with the original's."""

from __future__ import annotations

from helpers import runs_of

TINY = ("--epochs", "2", "--model", "mlp:hidden=[16]", "--batch-size", "64", "-q")


def test_reproduce_matches_the_original_run(invoke, mlflow_client, experiment):
    assert invoke("train", "--seed", "4", *TINY).exit_code == 0
    [original] = runs_of(mlflow_client, experiment)
    result = invoke("reproduce", original.info.run_id, "--tracking-uri", mlflow_client.tracking_uri, store=False)
    assert result.exit_code == 0, result.stderr
    assert "all metrics match" in result.output and "test_accuracy" in result.output
    _, again = runs_of(mlflow_client, experiment)
    assert again.data.tags["optiflow.reproduces"] == original.info.run_id
    assert again.data.params["seed"] == "4"
    assert again.data.metrics["test_loss"] == original.data.metrics["test_loss"]


def test_reproduce_exits_1_when_a_metric_differs(invoke, mlflow_client, experiment):
    assert invoke("train", *TINY).exit_code == 0
    [original] = runs_of(mlflow_client, experiment)
    mlflow_client.log_metric(original.info.run_id, "test_loss", 123.0, step=99)
    result = invoke("reproduce", original.info.run_id, "--tracking-uri", mlflow_client.tracking_uri, "-q",
                    store=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: 1 of ") and "test_loss" in result.stderr


def test_reproduce_rejects_unknown_and_parent_runs(invoke, mlflow_client, experiment, tmp_path):
    uri = mlflow_client.tracking_uri
    result = invoke("reproduce", "0123456789abcdef0123456789abcdef", "--tracking-uri", uri, store=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "no run '0123456789abcdef0123456789abcdef'" in result.stderr
    assert invoke("compare", "--vary", "lr=0.01", "--out", str(tmp_path), "--epochs", "1", "-q").exit_code == 0
    parent = next(r for r in runs_of(mlflow_client, experiment) if "mlflow.parentRunId" not in r.data.tags)
    result = invoke("reproduce", parent.info.run_id, "--tracking-uri", uri, store=False)
    assert result.exit_code == 2 and "compare parent run" in result.stderr
