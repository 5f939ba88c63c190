"""From a run to a model you can use: shapes follow the model, and the logged model takes raw inputs
(normalizer inside), answers in probabilities or original units, loads with pyfunc and pytorch, and serves."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from optiflow.config import RunConfig
from optiflow.data import DataContext, split
from optiflow.plugins import get_registry, registered_plugin
from optiflow.run import build, prepare

from helpers import assert_no_run, free_port, runs_of


def raw_test_split(run, tmp_path):
    """The run's test split as the dataset gives it (before normalization), from its logged settings."""
    params = run.data.params
    registry = get_registry()
    component = registry.get("dataset", params["data"])
    options = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("data.") and
               k.split(".", 1)[1] in component.defaults}
    source = build(component, DataContext(tmp_path, int(params["seed"])), **component.resolve_options(options))
    splits = split(source, float(params["val_split"]), float(params["test_split"]), int(params["seed"]))
    return source, splits.x_test, splits.y_test


def same_accuracy(run, accuracy):
    """Equal to the logged test_accuracy: exactly when the run trained on the CPU (where pyfunc
    predicts); within one sample after CUDA, whose kernels round differently."""
    logged, n = run.data.metrics["test_accuracy"], int(run.data.params["data.n_test"])
    tolerance = 1e-12 if run.data.params["device_type"] == "cpu" else 1.5 / n
    return abs(accuracy - logged) <= tolerance


def load(tracking_uri, run_id):
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(tracking_uri)
    uri = f"runs:/{run_id}/model"
    return uri, mlflow.pyfunc.load_model(uri), mlflow.models.Model.load(uri).metadata["optiflow"]


def trained(invoke, mlflow_client, experiment, *args):
    result = invoke("train", *args, "-q")
    assert result.exit_code == 0, result.output + result.stderr
    [run] = runs_of(mlflow_client, experiment)
    return run


def test_readme_opens_with_the_cnn_command():
    opening = (Path(__file__).resolve().parent.parent / "README.md").read_text().splitlines()[:40]
    assert any("optiflow train --model cnn --opt adam --sched plateau" in line for line in opening)


# --- shapes follow the model ---------------------------------------------------------------------


def test_digits_are_1x8x8_images_and_image_true_stays_valid(tmp_path):
    registry = get_registry()
    digits = registry.get("dataset", "digits")
    default = build(digits, DataContext(tmp_path, 0))
    assert default.x.shape == (1797, 1, 8, 8) and default.image and default.feature_names is None
    assert torch.equal(build(digits, DataContext(tmp_path, 0), image=True).x, default.x)
    flat = build(digits, DataContext(tmp_path, 0), image=False)
    assert flat.x.shape == (1797, 64) and not flat.image and flat.feature_names[:2] == ["pixel_0_0", "pixel_0_1"]
    iris = build(registry.get("dataset", "iris"), DataContext(tmp_path, 0))
    assert not iris.image and iris.feature_names[0] == "sepal length (cm)" and iris.target == "target"


@pytest.mark.parametrize("args, message", [
    (("--data", "iris", "--model", "cnn"),
     "model 'cnn' needs images (channels x height x width), but dataset 'iris' gives feature vectors of shape [4]"),
    (("--data", "digits:image=false", "--model", "lenet"),
     "model 'lenet' needs images (channels x height x width), but dataset 'digits' gives feature vectors"),
    (("--model", "cnn", "--norm", "pca"), "normalizer 'pca' turns the images into vectors"),
])
def test_conv_model_on_feature_vectors_is_one_line_exit_2_and_no_run(invoke, mlflow_client, experiment, args,
                                                                       message):
    result = invoke("train", *args, "-q")
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.strip().count("\n") == 0
    assert_no_run(mlflow_client, experiment)


@pytest.mark.parametrize("norm", get_registry().names("normalizer"))
def test_every_builtin_normalizer_becomes_part_of_the_exported_model(norm, tmp_path):
    """Raw test inputs through the exported pipeline == softmax of the model on the normalized split."""
    from optiflow.export import inference_module

    config = RunConfig.from_dict({"norm": norm, "epochs": 1, "device": "cpu", "data_dir": str(tmp_path)})
    run = prepare(config, get_registry())
    module, card, example = inference_module(run)
    assert card.raw_input and card.input_shape == [1, 8, 8] and card.image
    buffers = dict(module.normalizer.named_buffers())
    assert norm == "none" or buffers, "the fitted statistics are buffers of the logged module"
    source = get_registry().get("dataset", "digits").build(DataContext(tmp_path, config.seed))
    raw = split(source, config.val_split, config.test_split, config.seed).x_test  # run.source keeps 5 samples
    run.model.eval()
    with torch.no_grad():
        expected = run.model(run.splits.x_test).softmax(1)
        exported = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
        assert torch.allclose(exported(raw), expected, atol=1e-6)
        assert torch.equal(module(raw).argmax(1), expected.argmax(1))


# --- the logged model, end to end ----------------------------------------------------------------


@pytest.mark.slow
def test_cnn_default_command_reaches_095_and_its_model_takes_raw_images(invoke, mlflow_client, experiment,
                                                                         tracking_uri, tmp_path):
    """The README's first command; the pyfunc on raw images scores exactly the logged test_accuracy."""
    import mlflow.pytorch

    from optiflow.export import load_module

    run = trained(invoke, mlflow_client, experiment, "--model", "cnn", "--opt", "adam", "--sched", "plateau")
    accuracy = run.data.metrics["test_accuracy"]
    assert accuracy >= 0.95
    assert run.data.params["data.input_shape"] == "[1, 8, 8]"
    uri, model, meta = load(tracking_uri, run.info.run_id)
    assert meta == {"task": "classification", "classes": [str(i) for i in range(10)], "feature_names": None,
                    "input_shape": [1, 8, 8], "image": True, "target": None, "dataset": "digits", "raw_input": True}
    _, x, y = raw_test_split(run, tmp_path)
    probabilities = model.predict(x.numpy())
    assert list(probabilities.columns) == meta["classes"]
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert same_accuracy(run, (probabilities.to_numpy().argmax(1) == y.numpy()).mean())

    graph = mlflow.pytorch.load_model(uri)  # torch.export's inference graph: call it, no .eval()
    with torch.no_grad():
        assert np.allclose(graph(x).numpy(), probabilities.to_numpy(), atol=1e-6)
    with pytest.raises(NotImplementedError):
        graph.eval()
    module = load_module(uri)
    assert isinstance(module, torch.nn.Module) and module.eval() is module
    with torch.no_grad():
        assert np.allclose(module(x).numpy(), probabilities.to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_mlp_pyfunc_accuracy_on_raw_inputs_equals_the_logged_one(invoke, mlflow_client, experiment, tracking_uri,
                                                                  tmp_path):
    run = trained(invoke, mlflow_client, experiment, "--epochs", "5", "--norm", "minmax")
    _, model, meta = load(tracking_uri, run.info.run_id)
    _, x, y = raw_test_split(run, tmp_path)
    predicted = model.predict(x.numpy()).to_numpy().argmax(1)
    assert same_accuracy(run, (predicted == y.numpy()).mean())
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert "normalization.json" in artifacts, "still logged for reading, no longer needed to predict"


@pytest.mark.slow
def test_regression_model_predicts_in_original_units(invoke, mlflow_client, experiment, tracking_uri, tmp_path):
    run = trained(invoke, mlflow_client, experiment, "--data", "diabetes:target_scale=50", "--epochs", "20")
    _, model, meta = load(tracking_uri, run.info.run_id)
    assert meta["task"] == "regression" and meta["target"] == "progression" and meta["classes"] is None
    source, x, y = raw_test_split(run, tmp_path)
    rows = pd.DataFrame(x.numpy(), columns=meta["feature_names"])[meta["feature_names"][::-1]]  # any column order
    predicted = model.predict(rows)
    assert list(predicted.columns) == ["prediction"]
    original = y.numpy() * 50.0
    rmse = float(np.sqrt(np.mean((predicted["prediction"].to_numpy() - original) ** 2)))
    assert rmse == pytest.approx(run.data.metrics["test_rmse"] * 50.0, rel=1e-4 if run.data.params["device_type"] == "cpu"
                                 else 1e-2)
    assert 20 < predicted["prediction"].mean() < 400, "progression units, not divided by target_scale"


@pytest.mark.slow
def test_served_model_answers_raw_rows_over_http(invoke, mlflow_client, experiment, tracking_uri, tmp_path):
    run = trained(invoke, mlflow_client, experiment, "--data", "iris", "--epochs", "30")
    uri, model, meta = load(tracking_uri, run.info.run_id)
    _, x, _ = raw_test_split(run, tmp_path)
    rows = pd.DataFrame(x.numpy(), columns=meta["feature_names"])
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,  # it runs `uvicorn` from PATH: this venv's
             "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")},
        cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        body = json.dumps({"dataframe_split": rows.to_dict(orient="split")}).encode()
        answer = _post_until_served(f"http://127.0.0.1:{port}/invocations", body, server)
    finally:
        _stop(server)
    served = pd.DataFrame(answer["predictions"])
    assert list(served.columns) == ["setosa", "versicolor", "virginica"]
    assert np.allclose(served.to_numpy(), model.predict(rows).to_numpy(), atol=1e-6)


def _stop(server):
    """End the server's whole process group (mlflow runs uvicorn under it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def _post_until_served(url, body, server, timeout=180.0):
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"the server refused the rows: {exc.read().decode()[:2000]}") from None
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None:
                raise AssertionError(f"the server exited: {server.stderr.read().decode()[-2000:]}") from None
            if time.monotonic() > deadline:
                raise AssertionError("the server did not answer in time") from None
            time.sleep(0.5)


@pytest.mark.slow
def test_normalizer_without_module_still_trains_and_says_the_model_takes_normalized_inputs(
        tracking_uri, experiment, mlflow_client, capsys):
    from optiflow import hookimpl
    from optiflow.commands.train import train

    class Centre:
        """Subtracts the training mean (a plugin normalizer with no module())."""

        def fit(self, x):
            self.mean = x.mean(0, keepdim=True)
            return self

        def transform(self, x):
            return x - self.mean

        def state(self):
            return {}

    class CentrePlugin:
        @hookimpl
        def optiflow_register_data(self, register):
            register("centre", Centre, kind="normalizer")

    config = RunConfig.from_dict({"data": "iris", "norm": "centre", "epochs": 2, "device": "cpu",
                                  "tracking_uri": tracking_uri, "experiment": experiment})
    with registered_plugin(CentrePlugin(), name="centre-plugin"):
        result = train(config)
    run = mlflow_client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["optiflow.model_input"] == "normalized"
    assert capsys.readouterr().err.count("normalizer 'centre' has no module()") == 1
    _, model, meta = load(tracking_uri, result.run_id)
    assert meta["raw_input"] is False and meta["feature_names"] is None
    assert model.predict(np.zeros((2, 4), dtype=np.float32)).shape == (2, 3)
