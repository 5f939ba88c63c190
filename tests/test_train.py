"""`optiflow train` end to end: CLI -> training -> MLflow store, checked with MlflowClient."""

from __future__ import annotations

import mlflow.pytorch
import numpy as np
import pytest
import torch

from conftest import run_cli, runs_of


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
    batch = torch.randn(7, 64)
    assert model(batch).shape == (7, 10)


def test_logged_config_reproduces_the_run(invoke, mlflow_client, experiment, tmp_path):
    assert invoke("train", "--epochs", "2", "--seed", "3", "-q").exit_code == 0
    [run] = runs_of(mlflow_client, experiment)
    path = mlflow_client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert invoke("train", "--config", path, "-q").exit_code == 0
    first, second = runs_of(mlflow_client, experiment)
    assert first.data.metrics["test_loss"] == pytest.approx(second.data.metrics["test_loss"], rel=1e-6)


def test_same_seed_same_metrics_and_other_seed_differs(invoke, mlflow_client, experiment):
    for seed in ("5", "5", "6"):
        assert invoke("train", "--epochs", "2", "--seed", seed, "-q").exit_code == 0
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


def test_regression_uses_mse_and_reports_rmse(invoke, mlflow_client, experiment, monkeypatch):
    from optiflow.data import DataSource

    from optiflow.plugins import get_registry

    def line(ctx, *, n: int = 200):
        """y = 3x + 2."""
        x = torch.linspace(-1, 1, n).unsqueeze(1)
        return DataSource(x, (3 * x + 2).squeeze(1), "regression")

    registry = get_registry()
    registry.registrar("dataset", "test")("test-line", line)
    try:
        result = invoke("train", "--data", "test-line", "--model", "mlp:hidden=[8]", "--epochs", "3", "-q")
        assert result.exit_code == 0, result.stderr
    finally:
        registry.remove_plugin("test")
    [run] = runs_of(mlflow_client, experiment)
    assert run.data.params["loss"] if "loss" in run.data.params else True
    assert {"test_rmse", "test_r2", "test_loss"} <= set(run.data.metrics)
    assert "test_accuracy" not in run.data.metrics


def test_print_config_shows_layers(invoke, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 7\nopt: sgd:momentum=0.5\nlr: 0.2\n")
    result = invoke("train", "--config", str(config), "--lr", "0.05", "--print-config", store=False)
    assert result.exit_code == 0
    assert "epochs: 7" in result.output and "lr: 0.05" in result.output and "sgd:momentum=0.5" in result.output


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
    assert mlflow_client.get_experiment_by_name(experiment) is None or not runs_of(mlflow_client, experiment)


def test_unknown_component_in_a_real_process_has_no_traceback(tmp_path):
    proc = run_cli("train", "--opt", "adamw2", "-q", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown optimizer 'adamw2'" in proc.stderr
    assert not (tmp_path / "mlruns").exists() or not any((tmp_path / "mlruns").glob("artifacts/*/*"))


def test_default_store_is_project_local(tmp_path):
    proc = run_cli("train", "--epochs", "1", "-q", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert list((tmp_path / "mlruns" / "artifacts").glob("optiflow/*/artifacts/config.yaml"))


def test_help_does_not_import_torch_or_mlflow():
    import subprocess
    import sys

    code = (
        "import sys\nfrom optiflow.cli import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'mlflow', 'optuna', 'sklearn') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_summary_names_the_run_and_the_ui(tmp_path):
    import os
    import re

    proc = run_cli("train", "--epochs", "1", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "test_accuracy" in proc.stdout
    assert re.search(r"[0-9a-f]{32}", proc.stdout)
    assert "optiflow ui" in proc.stdout


def test_cuda_auto_falls_back_to_cpu_and_cuda_without_gpu_is_an_error(invoke, mlflow_client, experiment):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("train", "--device", "cuda", "--epochs", "1", "-q")
    assert result.exit_code == 2 and "no CUDA device is available" in result.stderr
    assert invoke("train", "--device", "auto", "--epochs", "1", "-q").exit_code == 0
    [run] = runs_of(mlflow_client, experiment)
    assert run.data.params["device_type"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda(invoke, mlflow_client, experiment):
    assert invoke("train", "--device", "cuda", "--epochs", "2", "-q").exit_code == 0
    [run] = runs_of(mlflow_client, experiment)
    assert run.data.params["device_type"] == "cuda"


def test_log_step_loss_logs_every_batch_and_matches_the_epoch_mean(invoke, mlflow_client, experiment):
    args = ("train", "--epochs", "2", "--batch-size", "500", "--val-split", "0", "--no-shuffle", "-q")
    assert invoke(*args, "--log-step-loss").exit_code == 0
    [run] = runs_of(mlflow_client, experiment)
    steps = mlflow_client.get_metric_history(run.info.run_id, "train_loss_step")
    assert [m.step for m in steps] == [1, 2, 3, 4, 5, 6]  # 1,437 training samples -> 3 batches per epoch
    first_epoch = mlflow_client.get_metric_history(run.info.run_id, "train_loss")[0].value
    sizes = [500, 500, 437]
    assert first_epoch == pytest.approx(sum(m.value * n for m, n in zip(steps[:3], sizes)) / 1437, rel=1e-5)
    assert invoke(*args).exit_code == 0
    assert mlflow_client.get_metric_history(runs_of(mlflow_client, experiment)[1].info.run_id, "train_loss_step") == []
