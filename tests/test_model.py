"""From a run to a model you can use: shapes follow the model, and the logged model takes raw inputs
(normalizer inside), answers in probabilities or original units, loads with pyfunc and pytorch, and serves."""

from __future__ import annotations

import contextlib
import json
import os
import re
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

from helpers import assert_no_run, free_port, runs_of, sklearn_digits_test_split


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


def assert_scores_the_logged_accuracy(run, model, test):
    """The pyfunc on raw digits as (N, 64) rows, as a 64-column DataFrame and as (N, 1, 8, 8) images
    scores exactly the run's test_accuracy, with the same probabilities in every form."""
    rows = test.drop(columns="target")
    assert rows.to_numpy().max() == 16, "raw: scikit-learn's own 0..16"
    answers = [model.predict(rows.to_numpy()), model.predict(rows), model.predict(rows.to_numpy().reshape(-1, 1, 8, 8))]
    for answer in answers:
        assert np.array_equal(answer.to_numpy(), answers[0].to_numpy())
        assert answer.attrs["out_of_range"] == 0
    assert same_accuracy(run, (answers[0].to_numpy().argmax(1) == test["target"].to_numpy()).mean())
    return answers[0]


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
    assert default.x.shape == (1797, 1, 8, 8) and default.image and default.feature_names[:2] == ["pixel_0_0", "pixel_0_1"]
    assert default.target == "target" and default.raw_scale == 16.0
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
    assert card.raw_scale == 16.0 and card.input_range == {"low": [0.0], "high": [16.0]} and example.max() > 1
    buffers = dict(module.normalizer.named_buffers())
    assert norm == "none" or buffers, "the fitted statistics are buffers of the logged module"
    source = get_registry().get("dataset", "digits").build(DataContext(tmp_path, config.seed))
    raw = split(source, config.val_split, config.test_split, config.seed).x_test * 16  # digits' own 0..16 (run.source keeps 5)
    run.model.eval()
    with torch.no_grad():
        expected = run.model(run.splits.x_test).softmax(1)
        exported = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
        assert torch.allclose(exported(raw), expected, atol=1e-6)
        assert torch.equal(module(raw).argmax(1), expected.argmax(1))


# --- raw means the source's own values -------------------------------------------------------------


def test_the_core_scales_raw_values_and_remembers_by_how_much():
    from optiflow.data import DataSource, value_range

    pixels = torch.tensor([[[[0, 128], [255, 7]]], [[[1, 2], [3, 4]]]], dtype=torch.uint8)
    images = DataSource(pixels, torch.tensor([0, 1]), "classification")
    assert images.raw_scale == 255.0 and torch.equal(images.x, pixels.float().div_(255.0))
    assert value_range(images, images.x) == ([0.0], [255.0]), "pixels share one range, in raw units"
    rows = torch.tensor([[0.0, 16.0], [3.0, 5.0]])
    digits = DataSource(rows, torch.tensor([0, 1]), "classification", raw_scale=16.0)
    assert torch.equal(digits.x, rows / 16) and value_range(digits, digits.x) == ([0.0], [16.0])
    table = DataSource(torch.tensor([[1.5, -2.0], [0.25, 7.0]]), torch.tensor([0.0, 1.0]), "regression")
    assert table.raw_scale == 1.0 and value_range(table, table.x) == ([0.25, -2.0], [1.5, 7.0]), "one per feature"
    with pytest.raises(Exception, match="raw_scale must be a finite number > 0"):
        DataSource(rows, torch.tensor([0, 1]), "classification", raw_scale=0.0)


DIGITS_CARD = {"task": "classification", "classes": ["a", "b"], "image": True, "input_shape": [1, 2, 2],
               "feature_names": ["p00", "p01", "p10", "p11"], "input_range": {"low": [0.0], "high": [16.0]}}


def weighted(x):
    """A stand-in model: the sample's values weighted 1, 2, 3, 4, as two "probabilities"."""
    score = (x.reshape(len(x), -1) * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum(1, keepdim=True)
    return torch.cat([score, -score], 1)


@pytest.mark.parametrize("form", ["frame", "reordered-frame-with-extras", "unnamed-frame", "flat-array", "images",
                                  "images-without-channel", "nested-lists", "dict"])
def test_the_served_model_takes_every_form_the_dataset_comes_in(form):
    from optiflow.serving import Predictor

    rows = np.array([[1, 2, 3, 4], [0, 16, 0, 5]], dtype=np.int64)
    names = DIGITS_CARD["feature_names"]
    given = {
        "frame": pd.DataFrame(rows, columns=names),
        "reordered-frame-with-extras": pd.DataFrame(rows, columns=names)[names[::-1]].assign(target=3),
        "unnamed-frame": pd.DataFrame(rows),
        "flat-array": rows,
        "images": rows.reshape(2, 1, 2, 2),
        "images-without-channel": rows.reshape(2, 2, 2).astype(np.float64),
        "nested-lists": rows.reshape(2, 1, 2, 2).tolist(),
        "dict": {name: rows[:, i].tolist() for i, name in enumerate(names)},
    }[form]
    result = Predictor(weighted, DIGITS_CARD).predict(given)
    assert list(result.columns) == ["a", "b"] and result["a"].tolist() == [30.0, 52.0]
    assert result.attrs["out_of_range"] == 0


@pytest.mark.parametrize("given, message", [
    (pd.DataFrame(np.ones((2, 3)), columns=["p00", "p01", "p11"]), "inputs lack the column 'p10'"),
    (np.ones((2, 5)), "inputs of shape [2, 5]; the model takes (N, 1, 2, 2) or (N, 4)"),
    (np.array([[1, np.nan, 0, 0]]), "row 0 holds NaN or infinite values"),
    (np.array([["a", "b", "c", "d"]]), "inputs must be numbers"),
    (np.zeros((0, 4)), "no rows to predict: the input (shape [0, 4]) is empty"),
    (pd.DataFrame(columns=["p00", "p01", "p10", "p11"]), "no rows to predict: the input (shape [0, 4]) is empty"),
], ids=["missing-column", "shape", "nan", "text", "empty-rows", "empty-frame"])
def test_the_served_model_refuses_what_it_cannot_take_by_name(given, message):
    from optiflow.serving import Predictor

    with pytest.raises(ValueError, match=re.escape(message)):
        Predictor(weighted, DIGITS_CARD).predict(given)


@pytest.mark.parametrize("body, message", [
    ({"inputs": [[1, 2, 3]]}, "inputs of shape [1, 3]; the model takes (N, 1, 2, 2) or (N, 4)"),
    ({"dataframe_split": {"columns": ["p00", "p01"], "data": [[1, 2]]}}, "inputs lack the columns 'p10', 'p11'"),
    ({"inputs": []}, "no rows to predict"),
], ids=["shape", "missing-columns", "empty"])
def test_the_scoring_server_answers_a_refused_input_with_optiflows_message_and_400(body, message):
    """What `mlflow models serve` answers: MLflow's scoring server turns any other exception into 'Encountered an
    unexpected error while evaluating the model' (HTTP 500 or 400, the reason only in a stack trace)."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations

    from optiflow.serving import Predictor

    served = SimpleNamespace(metadata=None, predict=Predictor(weighted, DIGITS_CARD).predict)
    with pytest.raises(MlflowException) as refused:
        invocations(json.dumps(body), "application/json", served, None)
    assert message in refused.value.message.split("\nError: ")[-1]
    assert refused.value.get_http_status_code() == 400


def test_values_outside_the_training_range_are_predicted_counted_and_logged(caplog):
    from optiflow.serving import Predictor

    rows = np.array([[0, 16, 0, 0], [255, 255, 0, 0], [-1, 0, 0, 0]], dtype=np.float32)
    with caplog.at_level("WARNING", logger="optiflow_serving"):
        result = Predictor(weighted, DIGITS_CARD).predict(rows)
    assert result["a"].tolist() == [32.0, 765.0, -1.0] and result.attrs["out_of_range"] == 3
    [record] = caplog.records
    assert record.getMessage().startswith("3 input values in 2 of 3 rows lie outside the range seen in training "
                                          "(e.g. row 1: 255 where training saw 0..16)")
    per_feature = {**DIGITS_CARD, "input_range": {"low": [0, 0, 0, 0], "high": [1, 1, 1, 9]}}
    outside = Predictor(weighted, per_feature).out_of_range(rows)
    assert outside.values == 4 and "'p01' 16 where training saw 0..1" in outside.message()
    assert Predictor(weighted, per_feature).out_of_range(np.float32([[1, 1, 1, 9.00001]])) is None, "float rounding"


# --- the logged model, end to end ----------------------------------------------------------------


@pytest.mark.slow
def test_cnn_default_command_reaches_095_and_its_model_takes_raw_images(invoke, mlflow_client, experiment,
                                                                         tracking_uri):
    """The README's first command; the pyfunc on scikit-learn's raw digits scores exactly the logged test_accuracy."""
    import mlflow.pytorch

    from optiflow.export import load_module

    run = trained(invoke, mlflow_client, experiment, "--model", "cnn", "--opt", "adam", "--sched", "plateau")
    accuracy = run.data.metrics["test_accuracy"]
    assert accuracy >= 0.95
    assert run.data.params["data.input_shape"] == "[1, 8, 8]"
    uri, model, meta = load(tracking_uri, run.info.run_id)
    assert meta == {"task": "classification", "classes": [str(i) for i in range(10)],
                    "feature_names": [f"pixel_{r}_{c}" for r in range(8) for c in range(8)],
                    "input_shape": [1, 8, 8], "image": True, "target": "target", "dataset": "digits",
                    "raw_input": True, "raw_scale": 16.0, "input_range": {"low": [0.0], "high": [16.0]}}
    test = sklearn_digits_test_split(run)
    probabilities = assert_scores_the_logged_accuracy(run, model, test)
    assert list(probabilities.columns) == meta["classes"]
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    x = torch.tensor(test.drop(columns="target").to_numpy(), dtype=torch.float32).reshape(-1, 1, 8, 8)

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
def test_default_mlp_takes_raw_digits_and_the_readmes_serve_command_answers_each_form(tmp_path):
    """In a project folder with optiflow's default store: pyfunc on scikit-learn's raw digits scores
    the logged test_accuracy; the README's serve command, pasted, answers JSON in every documented form,
    names a missing column, warns of out-of-range values and leaves no stray mlflow.db."""
    from mlflow.tracking import MlflowClient

    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environment["PATH"] = os.path.dirname(sys.executable) + os.pathsep + environment.get("PATH", "")  # this venv's mlflow
    trained = subprocess.run([sys.executable, "-m", "optiflow", "train", "--epochs", "5", "-q"], cwd=tmp_path,
                             env=environment, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(store)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    _, model, meta = load(store, run.info.run_id)
    test = sklearn_digits_test_split(run)
    expected = assert_scores_the_logged_accuracy(run, model, test)
    assert "normalization.json" in {a.path for a in client.list_artifacts(run.info.run_id)}

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    [command] = re.findall(r"^MLFLOW_TRACKING_URI=\S+ mlflow models serve .*$", readme, flags=re.M)
    port = free_port()
    command = command.replace("<run_id>", run.info.run_id).replace("--port 5001", f"--port {port}")
    assert str(port) in command
    rows = test.drop(columns="target")
    forms = {
        "dataframe_split": {"dataframe_split": rows.to_dict(orient="split")},
        "dataframe_records": {"dataframe_records": rows.to_dict(orient="records")},
        "flat rows": {"inputs": rows.to_numpy().tolist()},
        "images": {"inputs": rows.to_numpy().reshape(-1, 1, 8, 8).tolist()},
    }
    server = subprocess.Popen(["bash", "-c", command], env=environment, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        answers = {name: _post_until_served(url, json.dumps(body).encode(), server) for name, body in forms.items()}
        missing = _post_until_served(url, json.dumps({"dataframe_split": rows.drop(columns="pixel_3_3").to_dict(
            orient="split")}).encode(), server, refused=True)
        _post_until_served(url, json.dumps({"inputs": (rows.to_numpy() * 16).tolist()}).encode(), server)
    finally:
        log = _stop(server)
    for name, answer in answers.items():
        served = pd.DataFrame(answer["predictions"])
        assert list(served.columns) == meta["classes"], name
        assert np.allclose(served.to_numpy(), expected.to_numpy(), atol=1e-6), name
    assert "inputs lack the column 'pixel_3_3'" in json.loads(missing)["message"]
    assert "lie outside the range seen in training" in log
    assert not (tmp_path / "mlflow.db").exists(), "the serve command left a stray mlflow.db"


@pytest.mark.slow
def test_regression_model_predicts_in_original_units(invoke, mlflow_client, experiment, tracking_uri, tmp_path):
    run = trained(invoke, mlflow_client, experiment, "--data", "diabetes:target_scale=50", "--epochs", "20")
    _, model, meta = load(tracking_uri, run.info.run_id)
    assert meta["task"] == "regression" and meta["target"] == "target" and meta["classes"] is None
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
    shuffled = rows[meta["feature_names"][::-1]].assign(notes=7.0)  # the training columns in any order, and another
    try:
        body = json.dumps({"dataframe_split": shuffled.to_dict(orient="split")}).encode()
        answer = _post_until_served(f"http://127.0.0.1:{port}/invocations", body, server)
    finally:
        _stop(server)
    served = pd.DataFrame(answer["predictions"])
    assert list(served.columns) == ["setosa", "versicolor", "virginica"]
    assert np.allclose(served.to_numpy(), model.predict(rows).to_numpy(), atol=1e-6)


def _stop(server):
    """End the server's whole process group (mlflow runs uvicorn under it); what it wrote on stderr."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
    return server.stderr.read().decode(errors="replace") if server.stderr else ""


def _post_until_served(url, body, server, timeout=180.0, refused=False):
    """The server's JSON answer to ``body`` (or, ``refused``, its error message), waiting for it to start."""
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.loads(response.read())
            assert not refused, f"the server answered what it should refuse: {str(answer)[:500]}"
            return answer
        except urllib.error.HTTPError as exc:
            message = exc.read().decode()
            if refused:
                return message
            raise AssertionError(f"the server refused the rows: {message[:2000]}") from None
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


def test_the_optiflow_command_logs_the_run_files_and_model_layout_it_always_logged(tmp_path):
    """What cutting a command's fixed cost (issue 24) must leave alone, through the command as users run it: the
    run's files, the logged model's files, its MLmodel flavors, signature and example, its pinned requirements and
    its figures' sizes (a plot drawn on another canvas or at another size would show here)."""
    import yaml
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from optiflow import export

    from helpers import trained_run

    store, run = trained_run(tmp_path, "layout", "--epochs", "2")
    client = MlflowClient(store)
    listed = {a.path: a.is_dir for a in client.list_artifacts(run.info.run_id)}
    assert listed == {"checkpoint": True, "config.yaml": False, "gradient_flow.png": False,
                      "learning_curves.png": False, "normalization.json": False}
    [folder] = [path.parent for path in tmp_path.rglob("MLmodel")]
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert files == {"MLmodel", "code/optiflow_serving.py", "conda.yaml", "data/model.pt2", "input_example.json",
                     "python_env.yaml", "requirements.txt", "serving_input_example.json"}
    meta = yaml.safe_load((folder / "MLmodel").read_text())
    assert set(meta["flavors"]) == {"python_function", "pytorch"}
    assert meta["flavors"]["python_function"]["loader_module"] == "optiflow_serving"
    assert meta["flavors"]["pytorch"]["model_data"] == "data" and meta["run_id"] == run.info.run_id
    assert meta["signature"]["inputs"] is None
    assert [c["name"] for c in json.loads(meta["signature"]["outputs"])] == [str(d) for d in range(10)]
    assert meta["saved_input_example_info"]["type"] == "ndarray"
    assert meta["metadata"]["optiflow"]["input_shape"] == [1, 8, 8]
    example = json.loads((folder / "input_example.json").read_text())
    assert np.asarray(example).shape == (5, 1, 8, 8)
    pinned = (folder / "requirements.txt").read_text().splitlines()
    assert [line.split("==")[0] for line in pinned] == ["mlflow", "torch", "numpy", "pandas"]
    assert (folder / "code/optiflow_serving.py").read_text() == (Path(export.__file__).with_name("serving.py")
                                                                 .read_text())
    shown = {}
    for name in ("learning_curves.png", "gradient_flow.png"):
        with Image.open(client.download_artifacts(run.info.run_id, name, str(tmp_path / "got"))) as image:
            shown[name] = image.size
    assert shown == {"learning_curves.png": (1000, 400), "gradient_flow.png": (550, 400)}
    program = export.load_program(folder.as_uri())
    probabilities = program.module()(torch.rand(3, 1, 8, 8) * 16)
    assert torch.allclose(probabilities.sum(1), torch.ones(3))
