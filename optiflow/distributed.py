"""Data-parallel training on PyTorch's own engine: one process per device, started by torchrun.

``torchrun --nproc-per-node N -m optiflow train ...`` (or ``optiflow train --nproc N``,
which starts the same thing; or torchrun on several machines, ``--nnodes M``) runs the
command in every process; each checks its inputs, the processes agree that all are sound
(:func:`agree`), then each joins the process group (gloo on CPU, nccl on CUDA), trains on
its shard of the data with the model wrapped in ``DistributedDataParallel``, and only rank 0
talks to MLflow.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

from optiflow.errors import OptiflowError, first_line

if TYPE_CHECKING:
    import subprocess

    import torch

Shared = TypeVar("Shared")


@dataclass(frozen=True)
class Cluster:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    nnodes: int = 1

    def params(self) -> dict[str, int]:
        """What a run logs about its processes: ``world_size`` (processes in all) and ``nnodes`` (machines)."""
        return {"world_size": self.world_size, "nnodes": self.nnodes}

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_floats(self, values: list[float | torch.Tensor], device: torch.device) -> list[float]:
        """``values`` (scalar tensors or numbers) as floats, each summed over every process."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def share(self, value: Shared) -> Shared:
        """Rank 0's ``value`` on every process, so that all take the same decisions."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def current() -> Cluster:
    """The cluster described by torchrun's environment variables."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or world_size
    return Cluster(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        nnodes=int(os.environ.get("GROUP_WORLD_SIZE", "0")) or max(1, world_size // per_node),
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
        if is_loopback(os.environ.get("MASTER_ADDR", "")):  # every process on this machine: stay on lo
            os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", LOOPBACK)
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_leave)
    return cluster


def is_loopback(address: str) -> bool:
    """True for ``localhost`` and loopback IP literals (no name lookup: a host name may resolve to 127.0.1.1)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


CHECK_TIMEOUT = timedelta(minutes=30)  # as long as torch waits for a process group to form
_agreement = {"expected": False, "done": False}


def expect_agreement() -> None:
    """This process runs a command whose processes :func:`agree` (``train``): errors before that are verdicts."""
    _agreement["expected"] = True


def agree(error: BaseException | None, *, if_expected: bool = False) -> None:
    """Tell the other training processes whether this one's inputs are sound, before any run opens.

    Under torchrun (and ``--nproc``) every process checks its own inputs (files, data, plugins; rank 0
    also the tracking store), and one machine may lack a file the others have.  Each process puts its
    verdict in the launcher's store and waits for all of them: with ``error`` set, this process then
    returns (its caller raises its own error); else, when another process failed, this one raises
    an OptiflowError naming the first such rank, with that rank's exit code, so every process stops
    and rank 0 says why in one line.  Once per process (``if_expected``: only if :func:`expect_agreement`
    was called); nothing to do outside torchrun.
    """
    cluster = current()
    if (not cluster.enabled or _agreement["done"] or (if_expected and not _agreement["expected"])
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"):
        return
    _agreement["done"] = True
    verdict = "" if error is None else _verdict(error)
    try:
        import torch.distributed as dist

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=CHECK_TIMEOUT)
        prefix = f"optiflow/checks/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        store.set(f"{prefix}{cluster.rank}", verdict)
        keys = [f"{prefix}{rank}" for rank in range(cluster.world_size)]
        store.wait(keys, CHECK_TIMEOUT)
        verdicts = [store.get(key).decode() for key in keys]
        if cluster.main:
            store.set(f"{prefix}read", "")
        elif any(verdicts):  # stay until rank 0, the one that speaks, has read them (torchrun may stop it then)
            store.wait([f"{prefix}read"], timedelta(seconds=60))
    except Exception as exc:
        if error is not None:
            return
        raise OptiflowError(f"cannot reach the other training processes at {os.environ.get('MASTER_ADDR')}:"
                            f"{os.environ.get('MASTER_PORT')}: {first_line(exc)}") from None
    failed = next(((rank, v) for rank, v in enumerate(verdicts) if v), None)
    if error is None and failed is not None:
        rank, text = failed
        code, host, message = text.split("\t", 2)
        peer = OptiflowError(f"rank {rank} (on {host}) stopped: {message}")
        peer.exit_code = int(code)
        raise peer


def _verdict(error: BaseException) -> str:
    """``CODE<tab>HOST<tab>the error's first line`` (an unexpected error's type first, as the CLI says it)."""
    message = first_line(error) if isinstance(error, OptiflowError) else f"{type(error).__name__}: {first_line(error)}"
    return f"{getattr(error, 'exit_code', 1)}\t{socket.gethostname()}\t{message}"


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
    import subprocess
    import sys

    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(nproc)
    port = listener.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, master_listen_fd=listener.detach(),
                          wait_for_workers=False)
    base = {**os.environ, "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True",
            "GLOO_SOCKET_IFNAME": LOOPBACK, "NCCL_SOCKET_IFNAME": LOOPBACK, "OMP_NUM_THREADS": os.environ.get(
                "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    processes = [subprocess.Popen([sys.executable, "-m", "optiflow", *argv],
                                  env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0"})
                 for rank in range(nproc)]

    def forward(signum: int, _frame: FrameType | None) -> None:
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


def _wait_all(processes: list[subprocess.Popen[bytes]]) -> int:
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
