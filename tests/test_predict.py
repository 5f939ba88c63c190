"""`optiflow predict`: a logged model's predictions on a CSV, a .npy array or images, and the inputs it refuses.

The first tests read inputs against a hand-made ModelSpec (no MLflow); the slow ones train real runs
through the CLI into a store of their own and predict with their logged models.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from optiflow.errors import OptiflowError
from optiflow.predict_inputs import ModelSpec, read_inputs

from dataset_files import write_image_folder
from helpers import sklearn_digits_test_split

IRIS = ModelSpec("classification", ["setosa", "versicolor", "virginica"], ["sl", "sw", "pl", "pw"], (4,), False,
                 "species")
PIXELS = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
DIGITS = ModelSpec("classification", [str(i) for i in range(10)], PIXELS, (1, 8, 8), True, "target", raw_scale=16.0,
                   input_range={"low": [0.0], "high": [16.0]})
RGB = ModelSpec("classification", ["blue", "red"], None, (3, 12, 12), True, raw_scale=255.0)
UNNAMED = ModelSpec("regression", None, None, (2,), False, "y")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def png(path: Path, size: int, mode: str = "RGB", value: int = 200) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)
    return path


# --- reading inputs (no model) -------------------------------------------------------------------


def test_csv_columns_are_taken_by_name_with_the_id_column_and_the_labels(tmp_path):
    path = write(tmp_path / "x.csv", "id,pw,pl,sw,sl,species\na,4,3,2,1,setosa\nb,8,7,6,5,virginica\nc,1,1,1,1,\n")
    inputs = read_inputs(path, IRIS)
    assert list(inputs.x.columns) == ["sl", "sw", "pl", "pw"]
    assert inputs.x.to_numpy().tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1]]
    assert inputs.ids == ["a", "b", "c"]
    assert inputs.labels == ["setosa", "virginica", None]


def test_csv_without_target_or_id_numbers_its_rows(tmp_path):
    inputs = read_inputs(write(tmp_path / "x.csv", "sl,sw,pl,pw\n1,2,3,4\n5,6,7,8\n"), IRIS)
    assert inputs.ids == [0, 1] and inputs.labels is None


@pytest.mark.parametrize("cells, expect", [(["0", "2"], ["setosa", "virginica"]), (["1.0", "0"], ["versicolor", "setosa"])])
def test_numeric_labels_stand_for_the_class_of_that_index(tmp_path, cells, expect):
    path = write(tmp_path / "x.csv", "sl,sw,pl,pw,species\n" + "".join(f"1,2,3,4,{c}\n" for c in cells))
    assert read_inputs(path, IRIS).labels == expect


def test_unnamed_features_are_taken_in_order_and_numeric_targets_kept(tmp_path):
    inputs = read_inputs(write(tmp_path / "x.csv", "u,v,y\n1,2,3.5\n"), UNNAMED)
    assert inputs.x.tolist() == [[1.0, 2.0]] and inputs.labels == [3.5]


@pytest.mark.parametrize(
    "text, expect",
    [
        ("sl,sw,pl,pwx\n1,2,3,4\n", "has no column 'pw' (is 'pwx' it?); the model takes the columns sl, sw, pl, pw"),
        ("sl,sw,pl\n1,2,3\n", "has no column 'pw'"),
        ("sl,sw,pl,pw\n1,,3,4\n", "line 2: column 'sw' is empty"),
        ("sl,sw,pl,pw\n1,2,3,4\n1,NaN,3,4\n", "line 3: column 'sw' holds 'NaN', not a finite number"),
        ("sl,sw,pl,pw\n1,2,three,4\n", "column 'pl' holds 'three'"),
        ("sl,sw,pl,pw,species\n1,2,3,4,rose\n", "target column 'species' holds 'rose', not a class of the model"),
        ("sl,sw,pl,pw\n", "has a header but no data rows"),
        ("", "is empty"),
    ],
    ids=["misspelt-column", "missing-column", "empty-cell", "nan", "text", "unknown-class",
         "no-rows", "empty-file"],
)
def test_csv_mistakes_are_refused(tmp_path, text, expect):
    with pytest.raises(OptiflowError, match=re.escape(expect)):
        read_inputs(write(tmp_path / "x.csv", text), IRIS)


def test_unnamed_feature_count_is_checked(tmp_path):
    with pytest.raises(OptiflowError, match="has 3 feature columns; the model takes 2 features"):
        read_inputs(write(tmp_path / "x.csv", "a,b,c\n1,2,3\n"), UNNAMED)


@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (5, 64), (5, 8, 8), (1, 8, 8), (64,)])
def test_npy_images_in_the_shapes_that_say_the_same(tmp_path, shape):
    np.save(tmp_path / "x.npy", np.full(shape, 0.5, dtype=np.float32))
    inputs = read_inputs(str(tmp_path / "x.npy"), DIGITS)
    assert inputs.x.shape[1:] == (1, 8, 8) and inputs.ids == list(range(len(inputs.x)))


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float64])
def test_npy_values_are_raw_whatever_their_type(tmp_path, dtype):
    """Raw is the source's own units: a uint8 array is not divided by 255, out-of-range values are not refused."""
    np.save(tmp_path / "x.npy", np.array([[0] * 63 + [16], [0] * 63 + [255]], dtype=dtype))
    x = read_inputs(str(tmp_path / "x.npy"), DIGITS).x
    assert x.dtype == np.float32 and x.reshape(2, -1)[:, -1].tolist() == [16.0, 255.0]


def test_a_labelled_digits_csv_is_read_by_column_name_with_its_target(tmp_path):
    from sklearn.datasets import load_digits

    frame = load_digits(as_frame=True).frame.iloc[:6]
    frame[["target", *PIXELS[::-1]]].to_csv(tmp_path / "digits.csv", index=False)  # any column order
    inputs = read_inputs(str(tmp_path / "digits.csv"), DIGITS)
    assert list(inputs.x.columns) == PIXELS and np.array_equal(inputs.x.to_numpy(), frame[PIXELS].to_numpy())
    assert inputs.labels == [str(v) for v in frame["target"]]


def test_extra_columns_are_ignored_and_named_and_the_target_still_scores(tmp_path):
    """The training columns in any order, extra ones ignored (but named), the target column still read."""
    path = write(tmp_path / "x.csv", "note,pw,species,pl,sw,sl,extra\nhi,4,setosa,3,2,1,9\n")
    inputs = read_inputs(path, IRIS)
    assert list(inputs.x.columns) == ["sl", "sw", "pl", "pw"] and inputs.x.to_numpy().tolist() == [[1, 2, 3, 4]]
    assert inputs.labels == ["setosa"] and inputs.ignored == ["note", "extra"]
    assert inputs.ignored_note() == ("ignored the columns 'note', 'extra': not features of the model (if one holds "
                                     "the labels, name it with --target note)")
    assert read_inputs(write(tmp_path / "y.csv", "sl,sw,pl,pw\n1,2,3,4\n"), IRIS).ignored_note() is None


def test_a_target_column_of_another_name_is_named_by_target(tmp_path):
    path = write(tmp_path / "x.csv", "sl,sw,pl,pw,label\n1,2,3,4,setosa\n")
    unnamed = read_inputs(path, IRIS)
    assert unnamed.labels is None and unnamed.ignored == ["label"]
    assert "name it with --target label" in unnamed.ignored_note()
    assert read_inputs(path, IRIS, target="label").labels == ["setosa"]
    with pytest.raises(OptiflowError, match=re.escape("has no target column 'lbl'; its columns besides the model's "
                                                      "features: label")):
        read_inputs(path, IRIS, target="lbl")
    np.save(tmp_path / "x.npy", np.ones((1, 4)))
    with pytest.raises(OptiflowError, match=re.escape("--target names a CSV column; ")):
        read_inputs(str(tmp_path / "x.npy"), IRIS, target="label")


def test_flat_rows_of_an_image_model_without_names_are_taken_in_order(tmp_path):
    unnamed = ModelSpec("classification", ["a", "b"], None, (1, 2, 2), True, raw_scale=255.0)
    inputs = read_inputs(write(tmp_path / "x.csv", "p0,p1,p2,p3,label\n1,2,3,4,b\n"), unnamed, target="label")
    assert inputs.x.tolist() == [[1, 2, 3, 4]] and inputs.labels == ["b"]


def test_npy_features_get_the_feature_names(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 4)))
    assert list(read_inputs(str(tmp_path / "x.npy"), IRIS).x.columns) == ["sl", "sw", "pl", "pw"]


@pytest.mark.parametrize(
    "array, expect",
    [
        (np.zeros((2, 3, 8, 8), np.float32), "3-channel images, but the model takes 1-channel ones"),
        (np.zeros((2, 1, 10, 10), np.float32), "10x10 images, but the model takes 8x8 ones"),
        (np.full((2, 1, 8, 8), np.nan, np.float32), "sample 0: holds NaN or infinite values"),
        (np.array(["a", "b"]), "holds <U1 values; the model takes numbers"),
        (np.zeros((2, 5)), "the model takes (N, 1, 8, 8)"),
        (np.zeros((0, 64), np.float32), "holds an empty array of shape (0, 64): no samples to predict"),
        (np.zeros((0, 1, 8, 8), np.float32), "holds an empty array of shape (0, 1, 8, 8): no samples to predict"),
        (np.zeros(0), "holds an empty array of shape (0,): no samples to predict"),
        (np.zeros(128), "holds a flat array of 128 values; the model takes samples of 64 values (1x8x8 images "
                        "(channels x height x width)): save it shaped (N, 64), here (2, 64)"),
        (np.zeros(100), "holds a flat array of 100 values; the model takes samples of 64 values"),
    ],
    ids=["channels", "size", "nan", "strings", "shape", "empty-rows", "empty-images", "empty-flat", "flat-samples",
         "flat-odd"],
)
def test_npy_mistakes_are_refused(tmp_path, array, expect):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(OptiflowError, match=re.escape(expect)):
        read_inputs(str(tmp_path / "x.npy"), DIGITS)


def test_image_files_are_converted_to_the_channels_resized_and_given_in_the_models_raw_units(tmp_path):
    rgb = read_inputs(str(png(tmp_path / "big.png", 20)), DIGITS)
    assert rgb.x.shape == (1, 1, 8, 8) and np.allclose(rgb.x, 200 * 16 / 255, atol=16 / 255), "digits' 0..16"
    gray = read_inputs(str(png(tmp_path / "gray.png", 5, mode="L")), RGB)
    assert gray.x.shape == (1, 3, 12, 12) and gray.ids == ["gray.png"] and np.allclose(gray.x, 200), "0..255 pixels"


def test_a_folder_of_class_folders_gives_labels_and_relative_ids(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=2, size=10)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    inputs = read_inputs(str(tmp_path / "imgs"), RGB)
    assert inputs.ids == ["blue/0.png", "blue/1.png", "red/0.png", "red/1.png"]
    assert inputs.labels == ["blue", "blue", "red", "red"] and inputs.x.shape == (4, 3, 12, 12)


def test_a_flat_folder_has_no_labels(tmp_path):
    png(tmp_path / "imgs" / "a.png", 8)
    assert read_inputs(str(tmp_path / "imgs"), RGB).labels is None


@pytest.mark.parametrize(
    "name, spec, expect",
    [
        ("missing.csv", IRIS, "input not found: "),
        ("img.png", IRIS, "holds images, but the model takes 4 features; give a .csv or .npy"),
        ("x.csv", DIGITS, "has no column 'pixel_0_0'"),
        ("bad.png", DIGITS, "is not a readable image"),
        ("empty", DIGITS, "no image files in"),
        ("x.json", IRIS, "give a .csv file, a .npy array, an image file or a folder of images"),
        ("img.png", ModelSpec("classification", ["a"], None, (4, 8, 8), True), "give a .npy array"),
    ],
    ids=["missing", "image-to-tabular", "csv-without-the-pixel-columns", "unreadable-image", "empty-folder", "unknown-type",
         "four-channels"],
)
def test_inputs_the_model_cannot_take_are_refused(tmp_path, name, spec, expect):
    png(tmp_path / "img.png", 8)
    write(tmp_path / "x.csv", "a\n1\n")
    write(tmp_path / "bad.png", "not a png")
    write(tmp_path / "x.json", "{}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OptiflowError, match=re.escape(expect)):
        read_inputs(str(tmp_path / name), spec)


def test_the_model_gets_writable_arrays_from_read_only_frames():
    """pandas' copy-on-write hands out read-only arrays, and torch.from_numpy warns on every such input (two lines
    of "The given NumPy array is not writable" on stderr): the serving module passes a writable copy."""
    import pandas as pd

    from optiflow.serving import Predictor

    frame = pd.DataFrame(np.ones((3, 2), np.float32), columns=["a", "b"])
    assert not frame.to_numpy(dtype=np.float32).flags.writeable, "pandas gives a read-only view here"
    x, _ = Predictor(None, {"input_shape": [2], "feature_names": ["a", "b"], "task": "regression"}).inputs(frame)
    assert x.flags.writeable and x.flags.c_contiguous and x.dtype == np.float32


# --- the command on real runs ---------------------------------------------------------------------


def optiflow(*args: str):
    from optiflow.cli import cli

    return CliRunner().invoke(cli, list(args), prog_name="optiflow", catch_exceptions=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('predict') / 'mlflow.db'}"


def trained(store: str, *args: str) -> str:
    """Train one small run through the CLI into ``store``; its run id."""
    from mlflow.tracking import MlflowClient

    experiment = f"predict-{uuid.uuid4().hex[:8]}"
    result = optiflow("train", "--epochs", "3", "-q", "--tracking-uri", store, "--experiment", experiment, *args)
    assert result.exit_code == 0, result.output + result.stderr
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run.info.run_id


@pytest.fixture(scope="module")
def iris_run(store) -> str:
    return trained(store, "--data", "iris")


@pytest.fixture(scope="module")
def digits_run(store) -> str:
    return trained(store, "--data", "digits:image=true")


@pytest.fixture(scope="module")
def diabetes_run(store) -> str:
    return trained(store, "--data", "diabetes")


@pytest.fixture(scope="module")
def folder_run(store, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("images") / "train"
    write_image_folder(root, per_class=8, size=10)
    return trained(store, "--data", f"image-folder:path={root},size=12"), root


def card(store: str, run_id: str) -> dict:
    """The ``optiflow`` entry of the run's MLmodel metadata."""
    import mlflow
    from mlflow.models import Model

    mlflow.set_tracking_uri(store)
    return Model.load(f"runs:/{run_id}/model").metadata["optiflow"]


def predict(store: str, model: str, path: Path | str, *args: str):
    return optiflow("predict", model, "--input", str(path), "--tracking-uri", store, *args)


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def iris_csv(path: Path, meta: dict, *, target: bool, rows: int = 30) -> list[str]:
    """The first ``rows`` iris flowers under the model's feature names (and its target column); their classes."""
    from sklearn.datasets import load_iris

    bunch = load_iris()
    pick = np.arange(0, 150, 150 // rows)[:rows]
    header = list(meta["feature_names"]) + ([meta["target"]] if target else [])
    labels = [meta["classes"][i] for i in bunch.target[pick]]
    lines = [",".join(header)] + [",".join([*map(str, bunch.data[i]), *([labels[k]] if target else [])])
                                  for k, i in enumerate(pick)]
    path.write_text("\n".join(lines) + "\n")
    return labels


def shown_score(output: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.]+) on (\d+) labelled rows$", output, re.MULTILINE)
    assert match, output
    return float(match.group(1))


@pytest.mark.slow
def test_csv_with_the_target_column_prints_accuracy_and_writes_the_predictions(store, iris_run, tmp_path):
    meta = card(store, iris_run)
    assert meta["task"] == "classification" and meta["target"]
    labels = iris_csv(tmp_path / "flowers.csv", meta, target=True)
    out = tmp_path / "predictions.csv"
    result = predict(store, iris_run, tmp_path / "flowers.csv", "--output", str(out))
    assert result.exit_code == 0, result.stderr
    rows = read_csv(out)
    assert list(rows[0]) == ["id", "prediction", *(f"prob_{c}" for c in meta["classes"])]
    assert [r["id"] for r in rows] == [str(i) for i in range(30)]
    assert {r["prediction"] for r in rows} <= set(meta["classes"])
    for row in rows:
        probabilities = [float(row[f"prob_{c}"]) for c in meta["classes"]]
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert row["prediction"] == meta["classes"][int(np.argmax(probabilities))]
    accuracy = sum(r["prediction"] == y for r, y in zip(rows, labels)) / len(rows)
    assert shown_score(result.stdout, "accuracy") == pytest.approx(accuracy, abs=1e-4)
    assert f"30 predictions of runs:/{iris_run}/model written to {out}" in " ".join(result.stdout.split())


@pytest.mark.slow
def test_csv_without_the_target_writes_csv_to_stdout_when_it_is_not_a_terminal(store, iris_run, tmp_path):
    meta = card(store, iris_run)
    iris_csv(tmp_path / "flowers.csv", meta, target=False, rows=5)
    result = predict(store, f"runs:/{iris_run}/model", tmp_path / "flowers.csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4"] and "accuracy" not in result.output


@pytest.mark.slow
def test_stderr_holds_optiflow_lines_only(store, iris_run, tmp_path):
    """A real process predicting a CSV (float64 text cells) to a pipe: stderr is optiflow's score line and nothing
    else: no torch warning about read-only NumPy arrays, no MLflow progress bars, no NumPy RuntimeWarning."""
    import os
    import subprocess
    import sys

    labels = iris_csv(tmp_path / "flowers.csv", card(store, iris_run), target=True, rows=10)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "PYTHONWARNINGS")}
    done = subprocess.run([sys.executable, "-m", "optiflow", "predict", iris_run, "--input", "flowers.csv",
                           "--tracking-uri", store], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(list(csv.DictReader(io.StringIO(done.stdout)))) == len(labels)
    assert re.fullmatch(r"accuracy [0-9.]+ on 10 labelled rows\n", done.stderr), done.stderr


@pytest.mark.slow
def test_the_same_predictions_from_a_registered_model_version(store, iris_run, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(store)
    name = f"flowers-{uuid.uuid4().hex[:6]}"
    version = mlflow.register_model(f"runs:/{iris_run}/model", name).version
    iris_csv(tmp_path / "flowers.csv", card(store, iris_run), target=False, rows=5)
    by_run = predict(store, iris_run, tmp_path / "flowers.csv")
    by_name = predict(store, f"models:/{name}/{version}", tmp_path / "flowers.csv")
    assert by_name.exit_code == 0, by_name.stderr
    assert by_name.stdout == by_run.stdout


@pytest.mark.slow
def test_npy_and_image_files_on_a_digits_model(store, digits_run, tmp_path):
    from sklearn.datasets import load_digits

    meta = card(store, digits_run)
    assert meta["image"] and meta["input_shape"] == [1, 8, 8]
    bunch = load_digits()
    images = bunch.images[:20].astype(np.float32)  # raw: 0..16
    np.save(tmp_path / "digits.npy", images[:, None])
    result = predict(store, digits_run, tmp_path / "digits.npy", "--output", str(tmp_path / "a.csv"))
    assert result.exit_code == 0, result.stderr
    from_array = read_csv(tmp_path / "a.csv")
    assert list(from_array[0]) == ["id", "prediction", *(f"prob_{i}" for i in range(10))]
    assert [r["id"] for r in from_array] == [str(i) for i in range(20)]
    for i, image in enumerate(images):
        file = tmp_path / "imgs" / str(bunch.target[i]) / f"{i:02d}.png"
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image / 16 * 255).astype(np.uint8)).save(file)  # 0..255 pixels
    result = predict(store, digits_run, tmp_path / "imgs", "--output", str(tmp_path / "b.csv"))
    assert result.exit_code == 0, result.stderr
    from_files = {r["id"]: r for r in read_csv(tmp_path / "b.csv")}
    assert len(from_files) == 20 and "accuracy" in result.stdout
    for i, row in enumerate(from_array):
        again = from_files[f"{bunch.target[i]}/{i:02d}.png"]
        assert float(again["prob_0"]) == pytest.approx(float(row["prob_0"]), abs=0.02)


@pytest.mark.slow
def test_a_labelled_raw_digits_csv_scores_the_runs_test_accuracy(store, digits_run, tmp_path):
    """scikit-learn's digits as its CSV holds them (0..16, a ``target`` column, or labels named by --target)."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(store).get_run(digits_run)
    assert card(store, digits_run)["target"] == "target", "the model records its target's name"
    test = sklearn_digits_test_split(run)
    test.to_csv(tmp_path / "digits.csv", index=False)
    test.rename(columns={"target": "label"})[["label", *test.columns[:-1][::-1]]].to_csv(tmp_path / "label.csv",
                                                                                         index=False)
    logged = run.data.metrics["test_accuracy"]
    for path, args in ((tmp_path / "digits.csv", ()), (tmp_path / "label.csv", ("--target", "label"))):
        result = predict(store, digits_run, path, "--output", str(tmp_path / "p.csv"), *args)
        assert result.exit_code == 0, result.stderr
        assert shown_score(result.stdout, "accuracy") == pytest.approx(logged, abs=5e-5)
        assert f"on {len(test)} labelled rows" in result.stdout and "warning" not in result.stderr
    unscored = predict(store, digits_run, tmp_path / "label.csv", "--output", str(tmp_path / "p.csv"))
    assert unscored.exit_code == 0, unscored.stderr
    assert "note: ignored the column 'label': not a feature of the model (if it holds the labels, name it with " \
           "--target label)" in unscored.stderr and "accuracy" not in unscored.stdout
    assert len(read_csv(tmp_path / "p.csv")) == len(test)


@pytest.mark.slow
def test_values_outside_the_training_range_are_predicted_with_a_warning_line(store, digits_run, tmp_path):
    from sklearn.datasets import load_digits

    pixels = np.round(load_digits().images[:5] / 16 * 255).astype(np.uint8)  # 0..255, not digits' 0..16
    np.save(tmp_path / "pixels.npy", pixels)
    result = predict(store, digits_run, tmp_path / "pixels.npy", "--output", str(tmp_path / "p.csv"))
    assert result.exit_code == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    outside = int((pixels > 16).sum())
    assert line.startswith(f"warning: {outside} input values in 5 of 5 rows lie outside the range seen in training")
    assert "training saw 0..16" in line and len(read_csv(tmp_path / "p.csv")) == 5


@pytest.mark.slow
def test_regression_predictions_are_in_the_targets_units_with_rmse(store, diabetes_run, tmp_path):
    from sklearn.datasets import load_diabetes

    meta = card(store, diabetes_run)
    assert meta["task"] == "regression" and meta["classes"] is None
    bunch = load_diabetes()
    lines = [",".join([*meta["feature_names"], meta["target"]])]
    lines += [",".join(map(str, [*bunch.data[i], bunch.target[i]])) for i in range(40)]
    (tmp_path / "patients.csv").write_text("\n".join(lines) + "\n")
    result = predict(store, diabetes_run, tmp_path / "patients.csv", "--output", str(tmp_path / "p.csv"))
    assert result.exit_code == 0, result.stderr
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == ["id", "prediction"]
    predictions = np.array([float(r["prediction"]) for r in rows])
    rmse = float(np.sqrt(np.mean((predictions - bunch.target[:40]) ** 2)))
    assert shown_score(result.stdout, "rmse") == pytest.approx(rmse, rel=1e-3)
    assert predictions.mean() > 20, "in the target's own units (the model trains on target / 100)"


@pytest.mark.slow
def test_an_image_folder_model_predicts_a_folder_and_a_single_file(store, folder_run, tmp_path):
    run_id, root = folder_run
    meta = card(store, run_id)
    assert meta["classes"] == ["blue", "red"] and meta["input_shape"] == [3, 12, 12]
    result = predict(store, run_id, root, "--output", str(tmp_path / "p.csv"))
    assert result.exit_code == 0, result.stderr
    rows = read_csv(tmp_path / "p.csv")
    assert [r["id"] for r in rows][:2] == ["blue/0.png", "blue/1.png"]
    assert list(rows[0]) == ["id", "prediction", "prob_blue", "prob_red"]
    assert shown_score(result.stdout, "accuracy") >= 0
    single = predict(store, run_id, png(tmp_path / "gray.png", 30, mode="L"))
    assert single.exit_code == 0, single.stderr
    assert single.stdout.splitlines()[1].startswith("gray.png,")


# --- what the command refuses ----------------------------------------------------------------------


def assert_refused(result, expect: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output + result.stderr
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert expect in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, text, expect",
    [
        ("renamed.csv", "{0}x,{1},{2},{3}\n1,2,3,4\n", "has no column '{0}'"),
        ("three.csv", "{0},{1},{2}\n1,2,3\n", "has no column '{3}'"),
        ("nan.csv", "{0},{1},{2},{3}\n1,2,3,4\n1,nan,3,4\n", "line 3: column '{1}' holds 'nan', not a finite number"),
        ("images.png", None, "holds images, but the model takes 4 features"),
        ("missing.csv", None, "input not found: "),
    ],
    ids=["wrong-column-name", "too-few-columns", "nan", "image-to-tabular", "missing-file"],
)
def test_bad_tabular_input_is_one_line(store, iris_run, tmp_path, name, text, expect):
    names = card(store, iris_run)["feature_names"]
    if text is not None:
        (tmp_path / name).write_text(text.format(*names))
    elif name.endswith(".png"):
        png(tmp_path / name, 8)
    assert_refused(predict(store, iris_run, tmp_path / name), expect.format(*names))


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, expect",
    [((2, 1, 10, 10), "10x10 images, but the model takes 8x8 ones"),
     ((2, 3, 8, 8), "3-channel images, but the model takes 1-channel ones")],
    ids=["wrong-size", "wrong-channels"],
)
def test_bad_image_arrays_are_one_line(store, digits_run, tmp_path, shape, expect):
    np.save(tmp_path / "x.npy", np.zeros(shape, np.float32))
    assert_refused(predict(store, digits_run, tmp_path / "x.npy"), expect)


def test_unknown_runs_and_models_are_one_line(tracking_uri, mlflow_client, tmp_path):
    mlflow_client.search_experiments()  # the store exists: creating it logs lines of its own
    (tmp_path / "x.csv").write_text("a\n1\n")
    assert_refused(predict(tracking_uri, "0123456789abcdef0123456789abcdef", tmp_path / "x.csv"),
                   "no run '0123456789abcdef0123456789abcdef' in the tracking store")
    assert_refused(predict(tracking_uri, "runs:/0123456789abcdef/model", tmp_path / "x.csv"), "no run '0123456789abcdef'")
    assert_refused(predict(tracking_uri, "models:/no-such-model/1", tmp_path / "x.csv"), "cannot load models:/no-such-model/1")


def test_a_run_without_a_model_is_one_line(tracking_uri, mlflow_client, tmp_path):
    experiment = mlflow_client.create_experiment(f"no-model-{uuid.uuid4().hex[:8]}")
    run = mlflow_client.create_run(experiment)
    (tmp_path / "x.csv").write_text("a\n1\n")
    assert_refused(predict(tracking_uri, run.info.run_id, tmp_path / "x.csv"),
                   f"run '{run.info.run_id}' has no logged model at 'model'")


@pytest.mark.slow
def test_a_model_without_optiflow_metadata_is_one_line(tracking_uri, tmp_path):
    import mlflow
    import mlflow.pyfunc

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return model_input

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id=mlflow.create_experiment(f"foreign-{uuid.uuid4().hex[:8]}")) as run:
        mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=[])
    (tmp_path / "x.csv").write_text("a\n1\n")
    assert_refused(predict(tracking_uri, run.info.run_id, tmp_path / "x.csv"), "has no optiflow metadata")


def test_a_csv_without_a_header_row_is_told_to_have_one(tmp_path):
    path = write(tmp_path / "x.csv", "\n".join(",".join(["0.0"] * 63 + [str(i)]) for i in range(3)) + "\n")
    with pytest.raises(OptiflowError, match="first row holds numbers, not column names: the CSV needs a header row"):
        read_inputs(path, DIGITS)


def test_a_target_that_is_a_feature_column_is_refused(tmp_path):
    path = write(tmp_path / "x.csv", ",".join(PIXELS) + "\n" + ",".join(["1"] * 64) + "\n")
    with pytest.raises(OptiflowError, match="--target 'pixel_0_0' is a feature column of the model"):
        read_inputs(path, DIGITS, target="pixel_0_0")


@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (5, 8, 8), (5, 64)])
def test_a_flat_digits_model_takes_images_too(tmp_path, shape):
    """docs/models.md: a digits model (image=false too) takes 64 columns and (N, 1, 8, 8) images."""
    flat = replace(DIGITS, input_shape=(64,), image=False)
    np.save(tmp_path / "x.npy", np.arange(5 * 64, dtype=np.float32).reshape(shape))
    inputs = read_inputs(str(tmp_path / "x.npy"), flat)
    assert inputs.x.shape == (5, 64) and list(inputs.x.columns) == PIXELS
    assert inputs.x.to_numpy()[1, 3] == 64 + 3, "row-major: pixel_0_3 of the second image"


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (3, 8, 8), (3, 64)])
def test_the_pyfunc_of_a_flat_digits_model_takes_images_too(shape):
    import torch

    from optiflow.serving import Predictor

    card = {"task": "regression", "input_shape": [64], "image": False, "feature_names": PIXELS}
    predictor = Predictor(lambda x: x.sum(dim=1, keepdim=True), card)
    x = np.arange(3 * 64, dtype=np.float32).reshape(shape)
    with torch.no_grad():
        out = predictor.predict(x)
    assert np.allclose(np.asarray(out, dtype=np.float64).ravel(), np.arange(3 * 64).reshape(3, 64).sum(axis=1))


@pytest.mark.slow
def test_predict_and_export_leave_no_temporary_files(store, iris_run, tmp_path, monkeypatch):
    """docs/tracking.md: the copies of a logged model's files a command downloads are removed when it ends."""
    import tempfile

    rows = tmp_path / "rows.csv"
    iris_csv(rows, card(store, iris_run), target=False, rows=3)  # (MLflow's Model.load leaves a copy: not here)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # $TMPDIR of the command
    refused = tmp_path / "refused.csv"
    refused.write_text("a,b\n1,2\n")
    assert predict(store, iris_run, rows).exit_code == 0
    assert predict(store, iris_run, refused).exit_code == 2
    exported = optiflow("export", iris_run, "--onnx", str(tmp_path / "model.onnx"), "--tracking-uri", store)
    assert exported.exit_code == 0, exported.output + exported.stderr
    left = [path.relative_to(scratch) for path in scratch.rglob("*") if not path.name.startswith("torchinductor")
            and "torchinductor" not in path.parts[len(scratch.parts)]]
    assert left == [], left
