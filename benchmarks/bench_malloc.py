"""What optiflow's host-memory setting (optiflow.host) does for a CPU training loop.

glibc's malloc settings are process-wide and cannot be undone, so the same hand-written
tensor loop (the benchmark CNN of bench_train.py, Adam, randperm slicing) runs in fresh
processes, alternately with malloc as it is and with the setting optiflow applies at the
start of a CPU run, pair after pair.  Each process trains a warm-up epoch and times the
next.  Prints samples/s and minor page faults per step of both, and the paired ratio
tuned/untuned of every pair with their median.

    python benchmarks/bench_malloc.py                    # 10,000 images, batch 256, 4 pairs
    python benchmarks/bench_malloc.py --batch-size 32 --pairs 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD_FLAG = "--child"


def child(images: int, batch_size: int, tuned: bool) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import fashion_cnn, minor_faults, synthetic_images

    if tuned:
        from optiflow.host import keep_freed_memory

        assert keep_freed_memory(), "the C library is not glibc, or OPTIFLOW_MALLOC_TUNING=0"
    raw, labels = synthetic_images(images, seed=0)
    x = raw.float() / 255
    x = (x - x.mean()) / x.std()
    torch.manual_seed(0)
    model = fashion_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def epoch() -> int:
        steps = 0
        for index in torch.randperm(len(x)).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[index]), labels[index]).backward()
            optimizer.step()
            steps += 1
        return steps

    epoch()
    faults, started = minor_faults(), time.perf_counter()
    steps = epoch()
    seconds = time.perf_counter() - started
    faults = minor_faults() - faults
    print(json.dumps({"samples_per_s": len(x) / seconds, "faults_per_step": faults / steps}))


def measure(images: int, batch_size: int, tuned: bool) -> dict[str, float]:
    env = {**os.environ, "OPTIFLOW_MALLOC_TUNING": "1" if tuned else "0"}
    done = subprocess.run([sys.executable, __file__, CHILD_FLAG, str(images), str(batch_size), str(int(tuned))],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="training images per epoch [10000]")
    parser.add_argument("--batch-size", type=int, default=256, help="mini-batch size [256]")
    parser.add_argument("--pairs", type=int, default=4, help="untuned/tuned pairs, every other one tuned first [4]")
    args = parser.parse_args()
    print(f"hand-written tensor loop, benchmark CNN, {args.images} images, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs")
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for pair in range(1, args.pairs + 1):
        for tuned in (False, True) if pair % 2 else (True, False):
            results[tuned].append(measure(args.images, args.batch_size, tuned))
        plain, kept = results[False][-1], results[True][-1]
        print(f"  pair {pair}: malloc as it is {plain['samples_per_s']:6.0f}/s ({plain['faults_per_step']:6.0f} "
              f"page faults/step)   optiflow.host {kept['samples_per_s']:6.0f}/s ({kept['faults_per_step']:4.0f})   "
              f"ratio {kept['samples_per_s'] / plain['samples_per_s']:.2f}", flush=True)
    ratios = [k["samples_per_s"] / p["samples_per_s"] for p, k in zip(results[False], results[True])]
    print(f"median ratio optiflow.host / malloc as it is: {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        child(int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4])))
    else:
        main()
