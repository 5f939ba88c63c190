"""The runner's own cost per step, over a hand-written loop with the same optimizer.

A model so small (16-8-4 perceptron) that a step is almost all overhead: optiflow's
runner with ``norm none`` against a hand-written tensor loop, both with Adam on its fused
kernel, interleaved round by round in one process (every other round reversed).  Each
trains two epochs; the second is timed.  Prints microseconds per step of both, their
difference and the paired ratio runner/loop of every round with the median.

    python benchmarks/bench_overhead.py                  # 32,768 samples, batch 32, 6 rounds
    python benchmarks/bench_overhead.py --batch-size 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn


def tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32_768, help="training samples per epoch [32768]")
    parser.add_argument("--batch-size", type=int, default=32, help="mini-batch size [32]")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved repetitions [6]")
    args = parser.parse_args()
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    from optiflow.commands.train import train
    from optiflow.config import RunConfig
    from optiflow.data import DataSource
    from optiflow.plugins import get_registry

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 16, generator=generator)
    y = torch.randint(0, 4, (args.samples,), generator=generator)
    registry = get_registry()
    registry.registrar("data", "benchmark")(
        "overhead-blobs", lambda ctx: DataSource(x, y, "classification", num_classes=4, x_test=x[:256], y_test=y[:256]))
    registry.registrar("model", "benchmark")(
        "overhead-net", lambda input_shape, num_outputs: tiny(), "A 16-8-4 perceptron.", kind="model")
    store = tempfile.mkdtemp(prefix="optiflow-bench-")
    steps = -(-args.samples // args.batch_size)

    def loop() -> float:
        torch.manual_seed(0)
        model, loss_fn = tiny(), nn.CrossEntropyLoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

        def epoch() -> None:
            for index in torch.randperm(args.samples).split(args.batch_size):
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(x[index]), y[index]).backward()
                optimizer.step()

        epoch()
        started = time.perf_counter()
        epoch()
        return (time.perf_counter() - started) / steps

    def runner() -> float:
        marks: list[float] = []
        config = RunConfig.from_dict({
            "data": "overhead-blobs", "model": "overhead-net", "norm": "none", "opt": "adam", "lr": 1e-3,
            "batch_size": args.batch_size, "epochs": 2, "val_split": 0.0, "device": "cpu",
            "tracking_uri": f"sqlite:///{store}/mlflow.db", "experiment": "overhead",
        })
        train(config, on_epoch=lambda epoch, metrics: marks.append(time.perf_counter()), log_model=False)
        return (marks[1] - marks[0]) / steps

    print(f"16-8-4 perceptron, {args.samples} samples, batch {args.batch_size}, {torch.get_num_threads()} threads")
    results: dict[str, list[float]] = {"loop": [], "runner": []}
    variants = {"loop": loop, "runner": runner}
    for round_index in range(1, args.rounds + 1):
        for name in ("loop", "runner") if round_index % 2 else ("runner", "loop"):
            results[name].append(variants[name]())
        print(f"  round {round_index}: loop {results['loop'][-1] * 1e6:6.0f} us/step   "
              f"runner {results['runner'][-1] * 1e6:6.0f} us/step   "
              f"runner/loop time {results['runner'][-1] / results['loop'][-1]:.2f}", flush=True)
    loop_median, runner_median = (statistics.median(results[k]) for k in ("loop", "runner"))
    ratios = [r / p for p, r in zip(results["loop"], results["runner"])]
    print(f"median: loop {loop_median * 1e6:.0f} us/step, runner {runner_median * 1e6:.0f} us/step "
          f"(+{(runner_median - loop_median) * 1e6:.0f} us); median paired runner/loop time {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
