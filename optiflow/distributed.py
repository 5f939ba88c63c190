"""Data-parallel training on PyTorch's own engine: one process per device, started by torchrun.

``torchrun --nproc-per-node N -m optiflow train ...`` (or ``optiflow train --nproc N``,
which starts the same thing) runs N copies of the command; each joins the process
group (gloo on CPU, nccl on CUDA), trains on its shard of the data with the model
wrapped in ``DistributedDataParallel``, and only rank 0 talks to MLflow.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Cluster:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_floats(self, values: list[Any], device: torch.device) -> list[float]:
        """``values`` (scalar tensors or numbers) as floats, each summed over every process."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process, so that all take the same decisions."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def current() -> Cluster:
    """The cluster described by torchrun's environment variables."""
    return Cluster(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def is_main_process() -> bool:
    """False on every torchrun worker but rank 0 (they train quietly and log nothing)."""
    return current().main


def join(device: torch.device) -> Cluster:
    """Join the process group once (gloo on CPU, nccl on CUDA); nothing to do without torchrun."""
    cluster = current()
    if not cluster.enabled:
        return cluster
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_leave)
    return cluster


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``optiflow ARGV`` in ``nproc`` processes on this machine (torchrun --standalone); returns the exit code."""
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = parse_args(["--nproc-per-node", str(nproc), "-m", "optiflow", *argv])
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    config, command, command_args = config_from_args(args)
    try:
        elastic_launch(config, command)(*command_args)
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        sys.stderr.flush()
        return next((c for c in codes if c and c > 0), 1)
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` minus its ``--nproc N`` / ``--nproc=N`` (what every launched process runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
