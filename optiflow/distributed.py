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
    """Run ``optiflow ARGV`` in ``nproc`` processes on this machine; returns the exit code.

    Everything listens on the loopback interface only: the rendezvous store is a ``TCPStore``
    served here on a socket bound to 127.0.0.1 (the processes join it as clients, as under
    torchrun's agent), and gloo/NCCL pick the ``lo`` interface, so no port opens to the network.
    """
    import signal
    import socket
    import subprocess
    import sys

    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(nproc)
    port = listener.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, master_listen_fd=listener.detach(),
                          wait_for_workers=False)
    base = {**os.environ, "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True", "GLOO_SOCKET_IFNAME": LOOPBACK,
            "NCCL_SOCKET_IFNAME": LOOPBACK, "OMP_NUM_THREADS": os.environ.get(
                "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    processes = [subprocess.Popen([sys.executable, "-m", "optiflow", *argv],
                                  env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0"})
                 for rank in range(nproc)]

    def forward(signum: int, _frame: Any) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return _wait_all(processes)
    finally:
        signal.signal(signal.SIGTERM, previous)
        del store  # it owns the listening socket and closes it


LOOPBACK = "lo"


def _wait_all(processes: list[Any]) -> int:
    """Wait for every process; when one fails, stop the others. The first failing code (1 for a signal)."""
    import time

    code = 0
    while any(p.poll() is None for p in processes):
        failed = [p.returncode for p in processes if p.returncode not in (None, 0)]
        if failed and not code:
            code = next((c for c in failed if c > 0), 1)
            for process in processes:
                if process.poll() is None:
                    process.terminate()
        time.sleep(0.1)
    failed = [p.returncode for p in processes if p.returncode]
    return code or next((c for c in failed if c > 0), 1 if failed else 0)


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
