"""`optiflow train` end to end: CLI -> training -> MLflow store, checked with MlflowClient."""

from __future__ import annotations

import mlflow.pytorch
import pytest
import torch

from helpers import assert_no_run, run_cli, runs_of


def test_train_logs_a_complete_run(invoke, mlflow_client, experiment, tracking_uri):
    result = invoke("train", "--epochs", "3", "--seed", "1", "--run-name", "e2e", "--opt", "sgd:momentum=0.9", "-q")
    assert result.exit_code == 0, result.output + result.stderr
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "e2e"
    params = run.data.params
    assert params["opt"] == "sgd" and params["opt.momentum"] == "0.9" and params["opt.lr"] == "0.01"
    assert params["model"] == "mlp" and params["data"] == "digits" and params["epochs"] == "3"
    assert params["data.n_test"] == "360"
    for key in ("train_loss", "val_loss", "val_accuracy", "lr", "epoch_time", "samples_per_sec"):
        history = mlflow_client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3], key
    assert 0.8 < run.data.metrics["test_accuracy"] <= 1.0
    assert run.data.tags["optiflow.version"]
    assert "train" in run.data.tags["optiflow.command"]
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "learning_curves.png", "normalization.json"} <= artifacts

    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    batch = torch.rand(7, 1, 8, 8) * 16  # raw digits: 1x8x8 images of 0..16
    assert model(batch).shape == (7, 10)


def test_logged_config_reproduces_the_run(invoke, mlflow_client, experiment, tmp_path):
    assert invoke("train", "--epochs", "2", "--seed", "3", "-q").exit_code == 0
    [run] = runs_of(mlflow_client, experiment)
    path = mlflow_client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert invoke("train", "--config", path, "-q", "--no-reuse").exit_code == 0  # else the first run, reused
    first, second = runs_of(mlflow_client, experiment)
    assert first.data.metrics["test_loss"] == pytest.approx(second.data.metrics["test_loss"], rel=1e-6)
    assert first.data.tags["optiflow.key"] == second.data.tags["optiflow.key"]


def test_same_seed_same_metrics_and_other_seed_differs(invoke, mlflow_client, experiment):
    for seed in ("5", "5", "6"):
        assert invoke("train", "--epochs", "2", "--seed", seed, "-q", "--no-reuse").exit_code == 0
    a, b, c = (r.data.metrics for r in runs_of(mlflow_client, experiment))
    assert a["test_loss"] == b["test_loss"] and a["val_loss"] == b["val_loss"]
    assert a["test_loss"] != c["test_loss"]


@pytest.mark.slow
def test_defaults_reach_097_on_digits(invoke, mlflow_client, experiment):
    """The acceptance bar: no flags at all -> MLP on digits -> >= 0.97 test accuracy."""
    assert invoke("train", "-q").exit_code == 0
    [run] = runs_of(mlflow_client, experiment)
    assert run.data.metrics["test_accuracy"] >= 0.97
    assert len(mlflow_client.get_metric_history(run.info.run_id, "val_loss")) == 20


@pytest.mark.parametrize(
    "args, message",
    [
        (["--opt", "adamm"], "unknown optimizer 'adamm'. Did you mean 'adam'"),
        (["--model", "mpl"], "unknown model 'mpl'. Did you mean 'mlp'"),
        (["--opt", "sgd:momentun=0.9"], "has no option 'momentun' (did you mean 'momentum'?)"),
        (["--opt", "sgd:momentum=fast"], "option 'momentum' expects float"),
        (["--epochs", "0"], "epochs must be an integer >= 1"),
        (["--lr", "-1"], "learning rate must be > 0"),
        (["--val-split", "1.5"], "validation split must be in [0, 1)"),
        (["--batch-size", "0"], "batch size must be an integer >= 1 or 'full'"),
    ],
)
def test_bad_input_is_one_line_exit_2(invoke, mlflow_client, experiment, args, message):
    result = invoke("train", *args, "-q")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    assert message in result.stderr
    assert_no_run(mlflow_client, experiment)


def test_summary_names_the_run_and_the_ui(tmp_path):
    import re

    from mlflow.tracking import MlflowClient

    proc = run_cli("train", "--epochs", "1", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "test_accuracy" in proc.stdout
    assert re.search(r"[0-9a-f]{32}", proc.stdout)
    [run] = runs_of(MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db"), "optiflow")
    assert run.info.run_id in proc.stdout, "the summary names the run it logged"
    assert "optiflow ui" in proc.stdout


def test_default_run_names_say_what_ran(invoke, mlflow_client, experiment):
    tiny = ("--epochs", "1", "--model", "mlp:hidden=[16]", "--batch-size", "64", "-q")
    assert invoke("train", *tiny).exit_code == 0
    assert invoke("train", *tiny, "--opt", "sgd:momentum=0.9", "--sched", "plateau:patience=2").exit_code == 0
    assert [r.info.run_name for r in runs_of(mlflow_client, experiment)] == ["mlp-adam-digits", "mlp-sgd-plateau-digits"]


@pytest.mark.slow
def test_register_makes_a_model_version_that_loads_and_predicts(invoke, mlflow_client, experiment, tracking_uri,
                                                                 tmp_path):
    import numpy as np

    from optiflow.cli import cli

    result = invoke("train", "--epochs", "2", "--model", "mlp:hidden=[16]", "--register", experiment)
    assert result.exit_code == 0, result.stderr
    [run] = runs_of(mlflow_client, experiment)
    assert f"as '{experiment}' version 1: models:/{experiment}/1" in result.output
    assert mlflow_client.get_model_version(experiment, "1").run_id == run.info.run_id
    assert invoke("train", "--epochs", "1", "--model", "mlp:hidden=[16]", "--register", experiment, "-q").exit_code == 0
    assert mlflow_client.get_model_version(experiment, "2").run_id != run.info.run_id

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{experiment}/1")
    signature, card = model.metadata.signature, model.metadata.metadata["optiflow"]
    assert signature.inputs is None, "outputs only: optiflow_serving checks the inputs, naming what is wrong"
    assert signature.outputs.input_names() == card["classes"] == [str(c) for c in range(10)]
    assert card["input_shape"] == [1, 8, 8] and card["raw_input"] and card["image"] and card["dataset"] == "digits"
    raw = np.random.default_rng(0).uniform(0, 16, (3, *card["input_shape"])).astype(np.float32)  # digits' 0..16
    predicted = model.predict(raw)
    assert predicted.shape == (3, 10) and list(predicted.columns) == card["classes"]
    assert np.allclose(model.predict(raw.reshape(3, -1)).to_numpy(), predicted.to_numpy()), "rows of 64 pixels too"
    if "predict" in cli.commands:
        np.save(tmp_path / "x.npy", np.full((4, 1, 8, 8), 0.5, dtype=np.float32))
        predicted = invoke("predict", f"models:/{experiment}/1", "--input", str(tmp_path / "x.npy"),
                           "--output", str(tmp_path / "p.csv"), "--tracking-uri", tracking_uri, "-q")
        assert predicted.exit_code == 0, predicted.stderr
        assert len((tmp_path / "p.csv").read_text().splitlines()) == 5


def test_register_needs_a_model_name_mlflow_accepts(invoke, mlflow_client, experiment):
    """A name MLflow's registry refuses is refused by MLflow's own rules before anything trains (issue 21, item 5):
    one line, exit 2, no run left behind (it used to train, then fail to register)."""
    result = invoke("train", "--epochs", "1", "--model", "mlp:hidden=[16]", "--register", "a/b", "-q")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == ("Error: Invalid value for '--register': Invalid model name 'a/b'. "
                                     "Names cannot contain '/' or ':'.")
    exp = mlflow_client.get_experiment_by_name(experiment)
    assert exp is None or mlflow_client.search_runs([exp.experiment_id]) == []


def test_the_summary_says_where_the_store_is_and_the_run_logs_its_hashes(invoke, mlflow_client, experiment,
                                                                        tracking_uri):
    result = invoke("train", "--epochs", "1", "--model", "mlp:hidden=[8]", "--sched", "cosine")
    assert result.exit_code == 0, result.stderr
    [line] = [line for line in result.output.splitlines() if "tracking store" in line]
    assert tracking_uri in line
    [run] = runs_of(mlflow_client, experiment)
    assert len(run.data.tags["optiflow.weights_sha256"]) == len(run.data.tags["optiflow.data_sha256"]) == 64
    assert run.data.params["deterministic"] == "False"
