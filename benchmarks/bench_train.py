"""Training throughput of optiflow's runner against plain PyTorch loops, measured in one process.

The two-conv FashionMNIST CNN (Adam 1e-3) on FashionMNIST-shaped synthetic images,
interleaving the variants round by round, in alternating order (A B C D, D C B A, A B C D ...:
a drift in the machine's speed then favours no variant over a pair of rounds):

  A  tutorial loop: per-sample normalization in Dataset.__getitem__, DataLoader(shuffle=True),
     loss.item() every step
  B  hand-written tensor loop: pre-normalized tensor, randperm slicing
  C  optiflow's runner (optiflow.commands.train.train) with its defaults
  D  optiflow's runner with --compile --channels-last

Every variant trains two epochs per round from a fresh model; the second epoch is timed
(the first is warm-up: allocator, oneDNN primitives, torch.compile).  For C and D the time
is the wall clock between the runner's end-of-epoch callbacks, so it includes everything the
runner does per epoch, MLflow logging included.  Prints samples/s (median, min-max), the
paired ratios C/A, C/B, D/B of every round, the fraction of the float32 matmul peak reached
(2048x2048 matmul measured in the same run; CNN forward+backward FLOPs counted analytically),
the minor page faults per step, the MLflow share of the epoch time and the wall time of
``optiflow --help``.  Each round prints the machine's load average before and after it and whether
it counts (benchmarks/conditions.py: at most 0.5 per core); the summaries use comparable rounds
only, and say so when there are none.

Then peak memory, issue 24's case: 60,000 FashionMNIST-format images (IDX files written to a temporary
folder, as torchvision reads them), the built-in CNN, batch 256, one epoch, evaluated on 10,000 test
images; the hand-written tensor loop and ``optiflow train`` each a fresh process, alternating, their
maximum resident set size (``wait4``) and samples per second side by side.  Goal: optiflow at most 1.3x.

On a CPU the runner raises glibc's malloc thresholds (optiflow.host) so that a step's
activations are not handed back to the kernel and faulted in again on the next step.  That
setting is process-wide and cannot be undone, so the benchmark applies it to every variant
before the first round (the ratios then measure the loops, not the allocator);
``--system-malloc`` runs every variant on the C library's defaults instead.

    python benchmarks/bench_train.py                      # 20,000 images, batch 32 and 256, 6 rounds
    python benchmarks/bench_train.py --images 4000 --rounds 2 --batch-sizes 256
    python benchmarks/bench_train.py --system-malloc      # glibc's malloc defaults in every variant
    python benchmarks/bench_train.py --device cuda --amp  # on a GPU machine
    python benchmarks/bench_train.py --short              # a quick look: 4,000 images, 2 rounds, 10,000 for memory
    python benchmarks/bench_train.py --memory-only        # peak memory alone
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from conditions import Round, comparable_only, machine_line
from torch import nn

VARIANTS = {
    "A": "tutorial loop (Dataset.__getitem__ normalization, DataLoader, loss.item())",
    "B": "hand-written tensor loop (pre-normalized, randperm slicing)",
    "C": "optiflow runner, defaults",
    "D": "optiflow runner, --compile --channels-last",
}
IMAGE_SHAPE = (1, 28, 28)
CLASSES = 10


def fashion_cnn(input_shape: tuple = IMAGE_SHAPE, num_outputs: int = CLASSES) -> nn.Module:
    """The issue's CNN: conv 1->32, ReLU, BN, maxpool; conv 32->64, ReLU, BN, maxpool; 3136->128, ReLU, dropout; 128->10."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(32), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(64), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (height // 4) * (width // 4), 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, num_outputs),
    )


def cnn_train_flops_per_sample() -> float:
    """Forward + backward FLOPs of one sample through the convolutions and linear layers
    (2 per multiply-add; backward = grad wrt weights + grad wrt inputs, none for the image)."""
    conv1 = 2 * (1 * 9) * 32 * 28 * 28
    conv2 = 2 * (32 * 9) * 64 * 14 * 14
    fc1 = 2 * 3136 * 128
    fc2 = 2 * 128 * 10
    return 2 * conv1 + 3 * (conv2 + fc1 + fc2)


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 28x28 images: a per-class blurred template plus noise (learnable, like FashionMNIST in shape)."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.rand(CLASSES, 1, 7, 7, generator=generator)
    templates = nn.functional.interpolate(templates, size=(28, 28), mode="bilinear", align_corners=False)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    noise = torch.rand(n, 1, 28, 28, generator=generator)
    images = (0.6 * templates[labels] + 0.4 * noise).mul(255).round().to(torch.uint8)
    return images, labels


class Bench:
    """Shared state of one benchmark run: data, device, AMP and the timing helpers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.images, self.labels = synthetic_images(args.images, seed=0)
        self.test_images, self.test_labels = synthetic_images(max(256, args.images // 20), seed=1)
        scaled = self.images.float() / 255
        self.mean, self.std = scaled.mean().item(), scaled.std().item()
        self.amp_dtype = None
        if args.amp:
            cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            self.amp_dtype = torch.bfloat16 if self.device.type == "cpu" or cuda_bf16 else torch.float16
        self.tracking_dir = Path(tempfile.mkdtemp(prefix="optiflow-bench-"))
        self.mlflow_seconds: list[tuple[float, float]] = []
        self.mlflow_shares: list[float] = []
        self.faults_per_step = 0.0  # minor page faults per step of the last timed epoch

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def fresh(self) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
        torch.manual_seed(0)
        model = fashion_cnn().to(self.device)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3), nn.CrossEntropyLoss()

    def plain_loop(self, epoch: Callable[[Callable], int]) -> float:
        """Samples/s of the second of two epochs of a hand-written loop."""
        model, optimizer, loss_fn = self.fresh()
        scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype is torch.float16 else None
        steps = 0

        def step(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            nonlocal steps
            steps += 1
            optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                loss = loss_fn(model(xb), yb)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            return loss

        model.train()
        epoch(step)
        self.sync()
        steps, faults, started = 0, minor_faults(), time.perf_counter()
        seen = epoch(step)
        self.sync()
        seconds = time.perf_counter() - started
        self.faults_per_step = (minor_faults() - faults) / steps
        return seen / seconds

    def tutorial(self, batch_size: int) -> float:
        """(A) the loop of the PyTorch tutorials."""
        from torch.utils.data import DataLoader, Dataset

        mean, std = self.mean, self.std

        class NormalizingDataset(Dataset):
            def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
                self.images, self.labels = images, labels

            def __len__(self) -> int:
                return len(self.images)

            def __getitem__(self, index: int):
                image = self.images[index].float() / 255
                return (image - mean) / std, self.labels[index]

        loader = DataLoader(NormalizingDataset(self.images, self.labels), batch_size=batch_size, shuffle=True)

        def epoch(step) -> int:
            seen, running = 0, 0.0
            for xb, yb in loader:
                xb, yb = xb.to(self.device), yb.to(self.device)
                running += step(xb, yb).item()
                seen += len(xb)
            return seen

        return self.plain_loop(epoch)

    def tensor_loop(self, batch_size: int) -> float:
        """(B) pre-normalized tensor on the device, batches by randperm slicing."""
        x = ((self.images.float() / 255 - self.mean) / self.std).to(self.device)
        y = self.labels.to(self.device)

        def epoch(step) -> int:
            order = torch.randperm(len(x), device=self.device)
            for i in range(0, len(x), batch_size):
                index = order[i : i + batch_size]
                step(x[index], y[index])
            return len(x)

        return self.plain_loop(epoch)

    def optiflow(self, batch_size: int, *, fast: bool) -> float:
        """(C) / (D) optiflow.commands.train.train, timed between its end-of-epoch callbacks."""
        from optiflow.commands.train import train
        from optiflow.config import RunConfig

        marks: list[tuple[float, int]] = []
        overrides = {"compile": True, "channels_last": True} if fast else {}
        config = RunConfig.from_dict({
            "data": "bench-fashion", "model": MODEL_NAME, "opt": "adam", "lr": 1e-3, "batch_size": batch_size,
            "epochs": 2, "val_split": 0.0, "device": self.args.device, "amp": "auto" if self.args.amp else "off",
            "tracking_uri": f"sqlite:///{self.tracking_dir / 'mlflow.db'}", "experiment": "bench", **overrides,
        })
        flushed = len(self.mlflow_seconds)
        train(config, on_epoch=lambda epoch, metrics: marks.append((time.perf_counter(), minor_faults())),
              log_model=False)
        epoch_seconds = marks[1][0] - marks[0][0]
        self.faults_per_step = (marks[1][1] - marks[0][1]) / math.ceil(len(self.images) / batch_size)
        # the flushes that ended inside the timed epoch (short epochs share one every 2 s: maybe none)
        inside = [seconds for ended, seconds in self.mlflow_seconds[flushed:] if marks[0][0] < ended <= marks[1][0]]
        self.mlflow_shares.append(sum(inside) / epoch_seconds)
        return len(self.images) / epoch_seconds


MODEL_NAME = "cnn"


def register_components(bench: Bench) -> None:
    """Register the benchmark's data (and, unless the built-in ``cnn`` is this exact
    architecture, the benchmark's CNN) through the registry, as any plugin would."""
    global MODEL_NAME
    from optiflow.data import DataSource
    from optiflow.plugins import get_registry
    from optiflow.tracking import Tracker

    def bench_fashion(ctx):
        """FashionMNIST-shaped synthetic images (uint8, 10 classes) with a separate test set."""
        return DataSource(bench.images, bench.labels, "classification", num_classes=CLASSES,
                          x_test=bench.test_images, y_test=bench.test_labels)

    registry = get_registry()
    register = registry.registrar("data", "benchmark")
    register("bench-fashion", bench_fashion)
    if not _builtin_cnn_matches(registry):
        MODEL_NAME = "bench-cnn"
        registry.registrar("model", "benchmark")(
            "bench-cnn", lambda input_shape, num_outputs: fashion_cnn(input_shape, num_outputs),
            "The benchmark's two-conv FashionMNIST CNN.")

    flush = Tracker.flush

    def timed_flush(self) -> None:
        started = time.perf_counter()
        flush(self)
        ended = time.perf_counter()
        bench.mlflow_seconds.append((ended, ended - started))

    Tracker.flush = timed_flush


def _builtin_cnn_matches(registry) -> bool:
    """True when the registry's ``cnn`` builds the same layers with the same parameter shapes."""
    from optiflow.errors import OptiflowError

    try:
        component = registry.get("model", "cnn")
        built = component.factory(IMAGE_SHAPE, CLASSES, **component.resolve_options({}))
    except (OptiflowError, TypeError, ValueError):
        return False
    return _same_layers(built, fashion_cnn())


def _same_layers(one: nn.Module, other: nn.Module) -> bool:
    """Whether two models have the same leaf layers in the same order, with the same parameter shapes."""

    def signature(model: nn.Module) -> list:
        return [(type(m).__name__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)),
                 getattr(m, "p", None), getattr(m, "padding", None))
                for m in model.modules() if not list(m.children())]

    return signature(one) == signature(other)


def minor_faults() -> int:
    """Minor page faults of this process so far (memory the kernel had to map in again)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def matmul_peak(device: torch.device, repeats: int = 10) -> float:
    """Best float32 FLOP/s of a 2048x2048 matmul on ``device``."""
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * 2048**3 / best


def help_seconds(repeats: int = 5) -> float:
    """Median wall time of ``optiflow --help`` in a fresh process."""
    executable = shutil.which("optiflow", path=str(Path(sys.executable).parent)) or shutil.which("optiflow")
    command = [executable, "--help"] if executable else [sys.executable, "-m", "optiflow", "--help"]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="training images per epoch [20000]")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved repetitions of A B C D, every other one reversed [6]")
    parser.add_argument("--batch-sizes", default="32,256", help="comma-separated batch sizes [32,256]")
    parser.add_argument("--variants", default="ABCD", help="which of A, B, C, D to run [ABCD]")
    parser.add_argument("--device", default="cpu", help="cpu or cuda [cpu]")
    parser.add_argument("--amp", action="store_true", help="autocast in every variant (bf16; fp16 + GradScaler on CUDA without bf16)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc as it is in every variant (OPTIFLOW_MALLOC_TUNING=0)")
    parser.add_argument("--memory-images", type=int, default=60_000,
                        help="training images of the peak-memory case (issue 24's: 60000; 0 skips it) [60000]")
    parser.add_argument("--memory-rounds", type=int, default=2, help="alternating pairs of the peak-memory case [2]")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory case")
    parser.add_argument("--short", action="store_true",
                        help="a quick look, not a result: 4000 images, 2 rounds, batch 256; memory case 10000 images, 1 pair")
    args = parser.parse_args()
    if args.short:
        args.images, args.rounds, args.batch_sizes = 4000, 2, "256"
        args.memory_images, args.memory_rounds = min(args.memory_images, 10_000), 1
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    print(machine_line())
    if args.memory_only:
        peak_memory(args)
        return
    # malloc settings are process-wide and cannot be undone: the runner tunes them on its first CPU
    # run, so tune them (or keep the runner from tuning them) for every variant alike, up front
    from optiflow.host import ENV_SWITCH, keep_freed_memory

    if args.system_malloc:
        os.environ[ENV_SWITCH] = "0"
    malloc = "tuned for every variant (optiflow.host)" if keep_freed_memory() else "the C library's defaults"

    bench = Bench(args)
    register_components(bench)
    device = bench.device
    print(f"torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + (f", amp {bench.amp_dtype}" if bench.amp_dtype else ""))
    print(f"model for C/D: '{MODEL_NAME}'; {args.images} images; rounds {args.rounds}; malloc: {malloc}")
    for key in args.variants:
        print(f"  {key}: {VARIANTS[key]}")
    peak = matmul_peak(device)
    flops = cnn_train_flops_per_sample()
    print(f"float32 matmul peak (2048x2048): {peak / 1e9:.1f} GFLOP/s; CNN fwd+bwd: {flops / 1e6:.2f} MFLOP/sample")

    runners = {
        "A": bench.tutorial,
        "B": bench.tensor_loop,
        "C": lambda bs: bench.optiflow(bs, fast=False),
        "D": lambda bs: bench.optiflow(bs, fast=True),
    }
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        results: dict[str, list[float]] = {key: [] for key in args.variants}
        faults: dict[str, list[float]] = {key: [] for key in args.variants}
        rounds: list[Round] = []
        print(f"\nbatch size {batch_size}")
        for round_index in range(1, args.rounds + 1):
            with Round(f"round {round_index}", quiet=True) as conditions:
                for key in args.variants if round_index % 2 else reversed(args.variants):
                    results[key].append(runners[key](batch_size))
                    faults[key].append(bench.faults_per_step)
            rounds.append(conditions)
            line = "  ".join(f"{k}={v[-1]:7.0f}/s" for k, v in results.items())
            print(f"  round {round_index}: {line}  {ratio_text(results, round_index - 1)}\n"
                  f"    {conditions.describe()}", flush=True)
        kept, note = comparable_only(rounds, list(range(args.rounds)))
        print(f"  {note}")
        print(f"  {'variant':<8}{'median/s':>10}{'min-max/s':>18}{'of peak':>10}{'page faults/step':>18}")
        for key, all_values in results.items():
            values = [all_values[i] for i in kept]
            median = statistics.median(values)
            print(f"  {key:<8}{median:>10.0f}{f'{min(values):.0f}-{max(values):.0f}':>18}"
                  f"{median * flops / peak:>9.1%}{statistics.median(faults[key][i] for i in kept):>18.0f}")
        medians = {
            name: statistics.median(results[a][i] / results[b][i] for i in kept)
            for name, a, b in RATIOS if a in results and b in results
        }
        print("  median paired ratios: " + "  ".join(f"{k}={v:.2f}" for k, v in medians.items()))
    if bench.mlflow_shares:
        print(f"\nMLflow share of an optiflow epoch: median {statistics.median(bench.mlflow_shares):.2%}, "
              f"max {max(bench.mlflow_shares):.2%}")
    print(f"optiflow --help: {help_seconds():.3f} s (median of 5)")
    peak_memory(args)


RATIOS = (("C/A", "C", "A"), ("C/B", "C", "B"), ("D/B", "D", "B"))

ROOT = Path(__file__).resolve().parent.parent
MEMORY_BATCH = 256
MEMORY_TEST_IMAGES = 10_000
MEMORY_GOAL = 1.3
#: the hand-written tensor loop of the peak-memory case: torchvision reads the files, one pre-normalized
#: tensor, randperm slicing, then the test set in batches
HAND_LOOP = """
import json, sys, time
import torch
from torch import nn
from torchvision import datasets

root, batch_size, device = sys.argv[1], int(sys.argv[2]), torch.device(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from bench_train import builtin_cnn

torch.manual_seed(0)
train, test = datasets.FashionMNIST(root, train=True), datasets.FashionMNIST(root, train=False)
x = train.data.unsqueeze(1).float().div_(255)
mean, std = x.mean(), x.std()
x = x.sub_(mean).div_(std).to(device)
y = train.targets.to(device)
x_test = test.data.unsqueeze(1).float().div_(255).sub_(mean).div_(std).to(device)
y_test = test.targets.to(device)
model = builtin_cnn().to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.CrossEntropyLoss()
started = time.perf_counter()
model.train()
order = torch.randperm(len(x), device=device)
for i in range(0, len(x), batch_size):
    index = order[i : i + batch_size]
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(x[index]), y[index]).backward()
    optimizer.step()
if device.type == "cuda":
    torch.cuda.synchronize(device)
epoch = time.perf_counter() - started
model.eval()
correct = 0
with torch.no_grad():
    for i in range(0, len(x_test), batch_size):
        correct += int((model(x_test[i : i + batch_size]).argmax(1) == y_test[i : i + batch_size]).sum())
print(json.dumps({"epoch_seconds": epoch, "samples": len(x), "test_accuracy": correct / len(x_test)}))
"""


def builtin_cnn() -> nn.Module:
    """The built-in ``cnn``'s defaults written out as plain layers, for the hand-written loop (28x28 inputs)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2304, 600), nn.ReLU(), nn.Dropout(0.25), nn.Linear(600, 120), nn.ReLU(), nn.Linear(120, CLASSES),
    )


def _registry_cnn() -> nn.Module:
    from optiflow.plugins import get_registry

    component = get_registry().get("model", "cnn")
    return component.factory(IMAGE_SHAPE, CLASSES, **component.resolve_options({}))


def write_fashion_files(root: Path, n_train: int, n_test: int) -> None:
    """``root/FashionMNIST/raw``: the four IDX files of FashionMNIST's layout (tests/dataset_files.py's
    format), holding the benchmark's learnable synthetic images; one set of templates for both splits."""
    sys.path.insert(0, str(ROOT / "tests"))
    from dataset_files import idx_bytes

    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    images, labels = synthetic_images(n_train + n_test, seed=0)
    for split, part in (("train", slice(0, n_train)), ("t10k", slice(n_train, None))):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images[part, 0].numpy()))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels[part].numpy()))


def peak_rss(command: list[str], cwd: Path) -> tuple[float, str]:
    """(maximum resident set size in bytes, stdout) of ``command`` run to its end as a child process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            raise RuntimeError(f"{command[:4]} failed: {err.read().decode()[-2000:]}")
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kilobytes on Linux
        return usage.ru_maxrss * scale, out.read().decode()


def optiflow_epoch(folder: Path, experiment: str) -> tuple[float, int]:
    """(logged epoch_time, training samples) of the one run in ``experiment``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run.data.metrics["epoch_time"], int(run.data.params["data.n_train"])


def peak_memory(args: argparse.Namespace) -> None:
    """Issue 24's peak-memory case: the hand-written loop against ``optiflow train``, fresh processes."""
    if args.memory_images <= 0 or args.memory_rounds <= 0:
        return
    import json

    folder = Path(tempfile.mkdtemp(prefix="optiflow-bench-memory-"))
    test_images = min(MEMORY_TEST_IMAGES, max(256, args.memory_images // 6))
    write_fashion_files(folder, args.memory_images, test_images)
    print(f"\npeak memory: {args.memory_images} FashionMNIST-format images (IDX files), CNN, batch {MEMORY_BATCH}, "
          f"one epoch, {test_images} test images; max RSS of each process"
          + ("" if args.memory_images == 60_000 else " (not issue 24's 60,000-image case)"))
    if not _same_layers(builtin_cnn(), _registry_cnn()):
        raise SystemExit("the built-in cnn is no longer the layers of builtin_cnn(): update builtin_cnn()")
    hand = [sys.executable, "-c", HAND_LOOP, str(folder), str(MEMORY_BATCH), args.device, str(Path(__file__).parent)]
    rss: dict[str, list[float]] = {"hand": [], "optiflow": []}
    speed: dict[str, list[float]] = {"hand": [], "optiflow": []}
    rounds: list[Round] = []
    for index in range(1, args.memory_rounds + 1):
        experiment = f"bench-memory-{index}"
        optiflow = [sys.executable, "-m", "optiflow", "train", "--data", "fashion-mnist:download=false",
                    "--data-dir", str(folder), "--model", "cnn", "--opt", "adam", "--lr", "0.001",
                    "--batch-size", str(MEMORY_BATCH), "--epochs", "1", "--device", args.device,
                    "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--experiment", experiment, "-q"]
        with Round(f"pair {index}", quiet=True) as conditions:
            for side in ("hand", "optiflow") if index % 2 else ("optiflow", "hand"):
                peak, out = peak_rss(hand if side == "hand" else optiflow, folder)
                rss[side].append(peak)
                if side == "hand":
                    done = json.loads(out.strip().splitlines()[-1])
                    speed[side].append(done["samples"] / done["epoch_seconds"])
                else:
                    seconds, samples = optiflow_epoch(folder, experiment)
                    speed[side].append(samples / seconds)
        rounds.append(conditions)
        print(f"  pair {index}: hand loop {rss['hand'][-1] / 1e9:.2f} GB, {speed['hand'][-1]:.0f} samples/s; "
              f"optiflow {rss['optiflow'][-1] / 1e9:.2f} GB, {speed['optiflow'][-1]:.0f} samples/s; "
              f"memory optiflow/hand {rss['optiflow'][-1] / rss['hand'][-1]:.2f}\n    {conditions.describe()}",
              flush=True)
    kept, note = comparable_only(rounds, list(range(len(rounds))))
    print(f"  {note}")
    for side in ("hand", "optiflow"):
        print(f"  {side:<9} max RSS median {statistics.median(rss[side][i] for i in kept) / 1e9:.2f} GB, "
              f"{statistics.median(speed[side][i] for i in kept):.0f} samples/s")
    ratio = statistics.median(rss["optiflow"][i] / rss["hand"][i] for i in kept)
    print(f"  peak memory optiflow/hand: {ratio:.2f} (goal <= {MEMORY_GOAL})")


def ratio_text(results: dict[str, list[float]], index: int) -> str:
    return "  ".join(f"{name}={results[a][index] / results[b][index]:.2f}"
                     for name, a, b in RATIOS if a in results and b in results)


if __name__ == "__main__":
    main()
