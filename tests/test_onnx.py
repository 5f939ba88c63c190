"""``optiflow export MODEL --onnx FILE``: the ONNX model takes the same raw input as the logged model and
answers within 1e-5 of the torch program on the run's own test split (onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import run_cli, sklearn_digits_test_split, trained_run

onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    store, run = trained_run(root, "onnx", "--model", "cnn", "--epochs", "2")
    return store, run, root


@pytest.mark.slow
def test_the_onnx_model_answers_as_the_program_on_the_runs_test_split(digits_run):
    import torch

    from optiflow.export import load_program

    store, run, root = digits_run
    out = root / "digits.onnx"
    result = run_cli("export", run.info.run_id, "--onnx", str(out), "--tracking-uri", store, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime within" in result.stderr and out.stat().st_size > 0
    test = sklearn_digits_test_split(run)
    raw = test.drop(columns="target").to_numpy(dtype=np.float32).reshape(-1, 1, 8, 8).copy()  # 0..16, as load_digits gives
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    [given] = session.run(None, {session.get_inputs()[0].name: raw})
    import mlflow

    mlflow.set_tracking_uri(store)
    with torch.no_grad():
        expected = load_program(f"runs:/{run.info.run_id}/model").module()(torch.from_numpy(raw)).numpy()
    assert given.shape == (len(test), 10)
    assert np.abs(given - expected).max() <= 1e-5
    accuracy = float((given.argmax(axis=1) == test["target"].to_numpy()).mean())
    assert accuracy == pytest.approx(float(run.data.metrics["test_accuracy"]), abs=1e-9)


def test_export_mistakes_are_one_line(digits_run, tmp_path):
    store, run, root = digits_run
    cases = [
        (["export", "nosuchrun", "--onnx", str(tmp_path / "x.onnx"), "--tracking-uri", store], "no run 'nosuchrun'"),
        (["export", run.info.run_id, "--onnx", str(tmp_path / "missing" / "x.onnx"), "--tracking-uri", store],
         "cannot write"),
        (["export", run.info.run_id, "--tracking-uri", store], "Missing option '--onnx'"),
    ]
    for argv, expect in cases:
        result = run_cli(*argv, cwd=root)
        assert result.returncode != 0 and expect in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 3, result.stderr


@pytest.mark.slow
def test_a_regression_model_in_its_units_exports_at_the_default_tolerance(tmp_path):
    """Diabetes answers in the target's units (25..350): float32 rounding alone is ~1e-5 there, so the
    tolerance is relative above 1."""
    store, run = trained_run(tmp_path, "reg", "--data", "diabetes", "--epochs", "2")
    out = tmp_path / "diabetes.onnx"
    result = run_cli("export", run.info.run_id, "--onnx", str(out), "--tracking-uri", store, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0
