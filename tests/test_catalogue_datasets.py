"""File-based datasets read the real on-disk formats (CIFAR-10 without unpickling), and fail with one clear line."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from optiflow.data import DataContext
from optiflow.errors import OptiflowError
from optiflow.plugins import get_registry

from dataset_files import (
    CIFAR_CLASSES,
    MNIST_SIZES,
    write_cifar10,
    write_csv,
    write_hostile_cifar10,
    write_image_folder,
    write_mnist,
)


def load(name: str, root: Path, seed: int = 0, **options):
    return get_registry().get("dataset", name).build(DataContext(root, seed), **options)


@pytest.mark.parametrize("name, folder, gz", [("mnist", "MNIST", True), ("fashion-mnist", "FashionMNIST", False)])
def test_mnist_style_idx_files_load_through_torchvision(name, folder, gz, tmp_path):
    arrays = write_mnist(tmp_path, folder, gz=gz)
    source = load(name, tmp_path, download=False)
    assert source.x.shape == (MNIST_SIZES["train"], 1, 28, 28)
    assert source.x_test.shape == (MNIST_SIZES["t10k"], 1, 28, 28)
    assert torch.allclose(source.x[:, 0] * 255, torch.from_numpy(arrays["train_images"]).float())
    assert source.y.tolist() == arrays["train_labels"].tolist()
    assert source.y_test.tolist() == arrays["t10k_labels"].tolist()
    assert source.num_classes == 10 and len(source.classes) == 10
    if gz:
        assert (tmp_path / folder / "raw" / "train-images-idx3-ubyte").is_file()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar10_python_batches_load_without_unpickling(tmp_path, protocol):
    arrays = write_cifar10(tmp_path, protocol=protocol)
    source = load("cifar10", tmp_path, download=False)
    assert source.x.shape == (len(arrays["train"]), 3, 32, 32)
    assert source.x_test.shape == (len(arrays["test"]), 3, 32, 32)
    expected = torch.from_numpy(arrays["train"].reshape(-1, 3, 32, 32)).float() / 255
    assert torch.allclose(source.x, expected)
    assert source.classes == CIFAR_CLASSES


def test_cifar10_batch_that_would_run_code_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    write_hostile_cifar10(tmp_path, marker)
    with pytest.raises(OptiflowError, match="data_batch_1 is not a CIFAR-10 batch .it names posix.system.; refusing"):
        load("cifar10", tmp_path, download=False)
    assert not marker.exists()


def test_cifar10_batch_of_the_wrong_shape_is_refused(tmp_path):
    import pickle

    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}, handle)
    with pytest.raises(OptiflowError, match="test_batch is not a CIFAR-10 batch: 'data' is not N x 3072 bytes"):
        load("cifar10", tmp_path, download=False)


def test_subset_keeps_a_seeded_sample_of_the_training_set(tmp_path):
    write_mnist(tmp_path, "MNIST", gz=False)
    a, b = load("mnist", tmp_path, subset=10), load("mnist", tmp_path, subset=10)
    assert a.x.shape[0] == 10 and torch.equal(a.x, b.x)
    assert a.x_test.shape[0] == MNIST_SIZES["t10k"]


@pytest.mark.parametrize("name, location", [("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw"),
                                            ("cifar10", "cifar-10-batches-py")])
def test_missing_files_without_download_name_the_folder(name, location, tmp_path):
    with pytest.raises(OptiflowError, match=f"files not found in .*{location}; copy them there or allow the download"):
        load(name, tmp_path, download=False)


@pytest.mark.parametrize("name, module", [("mnist", "mnist"), ("fashion-mnist", "mnist"), ("cifar10", "cifar")])
def test_failed_download_is_one_clear_line(name, module, tmp_path, monkeypatch, invoke):
    """Offline: torchvision's own download (every mirror) fails, and the user gets one line naming the cause."""
    import importlib

    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise URLError("no network")

    monkeypatch.setattr(importlib.import_module(f"torchvision.datasets.{module}"), "download_and_extract_archive", offline)
    result = invoke("train", "--data", name, "--data-dir", str(tmp_path), "--epochs", "1")
    assert calls, "the download was not attempted"
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "the download failed (<urlopen error no network>)" in line


def test_present_files_are_never_downloaded(tmp_path, monkeypatch):
    from torchvision import datasets

    monkeypatch.setattr(datasets.MNIST, "download", lambda self: pytest.fail("tried to download present files"))
    write_mnist(tmp_path, "MNIST", gz=True)
    assert load("mnist", tmp_path).x.shape[0] == MNIST_SIZES["train"]


def test_csv_with_text_labels_is_classification(tmp_path):
    write_csv(tmp_path / "table.csv")
    source = load("csv", tmp_path, path="table.csv", target="label")
    assert source.task == "classification" and source.classes == ["big", "small"]
    assert source.x.shape == (60, 3)
    first = (tmp_path / "table.csv").read_text().splitlines()[1].split(",")
    assert source.x[0].tolist() == pytest.approx([float(first[0]), float(first[1]), float(first[3])])


def test_csv_with_real_valued_target_is_regression(tmp_path):
    (tmp_path / "r.csv").write_text("x,y\n" + "".join(f"{i},{i * 0.5 + 0.1}\n" for i in range(30)))
    source = load("csv", tmp_path, path=str(tmp_path / "r.csv"), target="y")
    assert source.task == "regression" and source.y[3] == pytest.approx(1.6)


@pytest.mark.parametrize(
    "content, options, message",
    [
        ("a,b\n1,2\n", {"target": "c"}, "has no column 'c'; its columns are: a, b"),
        ("a,b\n1,x\n2,y\n", {"target": "a"}, "line 2: column 'b' holds 'x', not a number"),
        ("a,b\n1,2\n", {"target": "b", "task": "regression", "path": "missing.csv"}, "missing.csv not found"),
        ("a,b\n1,yes\n", {"target": "b", "task": "regression"}, "is not numeric"),
    ],
)
def test_csv_mistakes_are_clear(content, options, message, tmp_path):
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(OptiflowError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load("csv", tmp_path, **{"path": "t.csv", **options})


def test_image_folder_reads_one_class_per_subfolder(tmp_path):
    write_image_folder(tmp_path / "pics", per_class=3, size=10)
    source = load("image-folder", tmp_path, path="pics", size=6)
    assert source.x.shape == (6, 3, 6, 6) and source.classes == ["blue", "red"]
    assert source.y.tolist() == [0, 0, 0, 1, 1, 1]
    blue, red = source.x[0], source.x[3]
    assert blue[2].mean() > blue[0].mean() and red[0].mean() > red[2].mean()
    gray = load("image-folder", tmp_path, path="pics", size=6, grayscale=True)
    assert gray.x.shape == (6, 1, 6, 6)


def test_synthetic_problems_follow_their_formulas_with_seeded_noise(tmp_path):
    for name, function in (("linear", lambda x: 3 * x + 2), ("sine", np.sin), ("cubic", lambda x: x**3)):
        clean = load(name, tmp_path, noise=0.0, n=50)
        assert torch.allclose(clean.y, function(clean.x[:, 0]).float(), atol=1e-5), name
        noisy, again, other = (load(name, tmp_path, seed=s, noise=0.1) for s in (1, 1, 2))
        assert torch.equal(noisy.y, again.y) and not torch.equal(noisy.y, other.y)
        assert float((noisy.y - function(noisy.x[:, 0])).std()) == pytest.approx(0.1, rel=0.3)
    assert float(load("sine", tmp_path).x.abs().max()) <= 5.0


def test_bundled_sklearn_datasets(tmp_path):
    shapes = {"iris": (150, 4, 3), "wine": (178, 13, 3), "breast-cancer": (569, 30, 2)}
    for name, (n, features, classes) in shapes.items():
        source = load(name, tmp_path)
        assert source.x.shape == (n, features) and source.num_classes == classes, name
    diabetes = load("diabetes", tmp_path)
    assert diabetes.task == "regression" and diabetes.x.shape == (442, 10)
    assert float(diabetes.y.max()) == pytest.approx(3.46)
    assert load("digits", tmp_path, image=True).x.shape == (1797, 1, 8, 8)
    assert load("digits", tmp_path).x.shape == (1797, 1, 8, 8)
    assert load("digits", tmp_path, image=False).x.shape == (1797, 64)
