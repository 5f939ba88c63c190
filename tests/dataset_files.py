"""Small dataset files in the real on-disk formats, written by tests (no download, no bundled binaries)."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

MNIST_SIZES = {"train": 40, "t10k": 20}
CIFAR_PER_BATCH = 6
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file (the MNIST format): magic 0x0000080N, big-endian sizes, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, folder: str, *, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """MNIST-style ``<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; returns the arrays."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in MNIST_SIZES.items():
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
    return arrays


def write_cifar10(root: Path, seed: int = 0, protocol: int = 2) -> dict[str, np.ndarray]:
    """CIFAR-10's python version: pickled ``data_batch_1..5``, ``test_batch`` and ``batches.meta`` (protocol 2 as CIFAR's own)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, list] = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(CIFAR_PER_BATCH, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=CIFAR_PER_BATCH)]
        with open(folder / name, "wb") as handle:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, handle, protocol=protocol)
        arrays["test" if name == "test_batch" else "train"].append(data)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": CIFAR_PER_BATCH}, handle, protocol=protocol)
    return {key: np.concatenate(value) for key, value in arrays.items()}


def write_csv(path: Path, rows: int = 60, seed: int = 0) -> None:
    """Two numeric features and a text label column that depends on them."""
    rng = np.random.default_rng(seed)
    lines = ["a,b,label,c"]
    for _ in range(rows):
        a, b, c = rng.normal(size=3)
        lines.append(f"{a:.4f},{b:.4f},{'big' if a + b > 0 else 'small'},{c:.4f}")
    path.write_text("\n".join(lines) + "\n")


def write_image_folder(root: Path, per_class: int = 6, size: int = 10) -> None:
    """``root/<class>/<n>.png`` RGB images of two classes (red-ish and blue-ish)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, channel in (("blue", 2), ("red", 0)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
            pixels[..., channel] = 200
            Image.fromarray(pixels).save(root / label / f"{i}.png")


def write_all(root: Path) -> dict[str, object]:
    """Every file-based dataset's files under ``root`` (the --data-dir of the tests)."""
    return {
        "mnist": write_mnist(root, "MNIST", gz=True),
        "fashion-mnist": write_mnist(root, "FashionMNIST", gz=False, seed=1),
        "cifar10": write_cifar10(root),
        "csv": write_csv(root / "table.csv"),
        "image-folder": write_image_folder(root / "images"),
    }


DATASET_SPECS = {
    "mnist": "mnist:download=false",
    "fashion-mnist": "fashion-mnist:download=false",
    "cifar10": "cifar10:download=false",
    "csv": "csv:path=table.csv,target=label",
    "image-folder": "image-folder:path=images,size=12",
}


class ShellCommand:
    """Unpickling this runs ``command``: what a hostile dataset file would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def write_hostile_cifar10(root: Path, marker: Path) -> None:
    """CIFAR-10 files whose first batch runs ``touch marker`` when unpickled."""
    write_cifar10(root)
    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as handle:
        pickle.dump({"data": ShellCommand(f"touch {marker}"), "labels": []}, handle)


# --- hostile files: a user's mistake or an attacker's, each to be refused in one line with bounded work ---------


def bomb_png(side: int = 20_000) -> bytes:
    """A 90-byte PNG whose header declares ``side`` x ``side`` pixels (a decompression bomb past Pillow's limit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def png_bytes(side: int = 8) -> bytes:
    """A real ``side`` x ``side`` grey PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def lying_npy(shape: tuple[int, ...] = (10**12, 4), data: bytes = b"\0" * 32) -> bytes:
    """A ``.npy`` file of ~150 bytes whose header declares ``shape`` float64 values."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.ones(3), b=np.zeros(2))
    return buffer.getvalue()


def wide_csv(columns: int, rows: int, header: list[str] | None = None) -> str:
    """A CSV of ``columns`` columns named c0, c1 ... (or ``header``) and ``rows`` rows of ones."""
    names = header or [f"c{i}" for i in range(columns)]
    line = ",".join(["1"] * len(names))
    return ",".join(names) + "\n" + "\n".join([line] * rows) + "\n"
