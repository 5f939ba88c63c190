"""Where and how a run computes: one decision object for the device, mixed precision, memory
layout, fused optimizer kernels and how training batches reach the device.

Every choice the user left open (``--device auto``, ``--channels-last`` unset ...) is made
here once, from the configuration, the model and the data, and logged as made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from optiflow.config import RunConfig
from optiflow.errors import OptiflowError
from optiflow.schedule import samples_per_batch


@dataclass(frozen=True)
class Setup:
    """The resolved computing decisions of one run."""

    device: torch.device
    #: autocast dtype, None when mixed precision is off
    amp_dtype: torch.dtype | None
    #: model and images in NHWC layout
    channels_last: bool
    #: training batches come through a DataLoader from host memory instead of slices of one device tensor
    streamed: bool
    #: CPU threads for the run's kernels (None: PyTorch's default, left as it is)
    threads: int | None = None

    @property
    def grad_scaler(self) -> bool:
        """fp16 autocast needs a GradScaler; bf16 and fp32 do not."""
        return self.amp_dtype is torch.float16


def decide(config: RunConfig, device: torch.device, model: nn.Module, x_train: Tensor, y_train: Tensor) -> Setup:
    """The run's :class:`Setup`; raises OptiflowError for a combination that cannot work."""
    channels_last = config.channels_last
    if channels_last is None:
        channels_last = use_channels_last(model, x_train, device)
    elif channels_last and x_train.ndim != 4:
        raise OptiflowError(
            f"--channels-last is for conv nets on images (N, C, H, W); this data has shape {list(x_train.shape[1:])}"
        )
    return Setup(device, amp_dtype(config.amp, device), channels_last,
                 streams_batches(config, x_train, y_train, device), cpu_threads(config, device, model, x_train))


#: a CPU step over fewer parameter x sample products than this runs on one thread
SMALL_STEP = 1 << 24


def cpu_threads(config: RunConfig, device: torch.device, model: nn.Module, x_train: Tensor) -> int | None:
    """One thread for a small model on the CPU: its kernels are too short to split, and threads that wait
    on each other (worse on a busy machine) cost more than they bring (2.3 ms vs 14 ms a step measured on
    2 loaded cores).  None (PyTorch's default) for bigger steps, other devices or a set ``OMP_NUM_THREADS``.
    ``--deterministic`` fixes one thread on the CPU, whatever the machine: a reduction split over another
    number of threads may round otherwise."""
    if device.type == "cpu" and config.deterministic:
        return 1
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    batch = samples_per_batch(config.batch_size, len(x_train))
    work = sum(p.numel() for p in model.parameters()) * batch
    return 1 if work < SMALL_STEP else None


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error.  Under
    data-parallel training an unnumbered CUDA device is the process's local rank."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptiflowError("--device cuda was asked for, but no CUDA device is available (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptiflowError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are available")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptiflowError("--device mps was asked for, but MPS is not available")
    return device


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (None when off); fp16 needs CUDA."""
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if mode == "fp16" else torch.bfloat16
    if device.type == "cpu" and mode in ("auto", "bf16"):
        return torch.bfloat16
    raise OptiflowError(f"--amp {mode} is not supported on {device.type}: use --amp bf16 on CPU, fp16 or bf16 on CUDA")


def use_channels_last(model: nn.Module, x: Tensor, device: torch.device) -> bool:
    """What ``--channels-last`` left unset means: NHWC for a model with 2-D convolutions on
    images (N, C, H, W) on the CPU, where oneDNN's NHWC convolutions are faster
    (docs/performance.md).  Off on CUDA, where it was not measured."""
    return device.type == "cpu" and x.ndim == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())


def streams_batches(config: RunConfig, x_train: Tensor, y_train: Tensor, device: torch.device) -> bool:
    """Whether training batches go through a DataLoader from host memory rather than
    being sliced from one tensor on the device: for augmentation, worker processes,
    or a training split too large for the device's free memory."""
    if config.aug or config.workers > 0:
        return True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return x_train.nbytes + y_train.nbytes > free // 2
    return False


def use_fused_kernels(optimizer: torch.optim.Optimizer) -> None:
    """Switch a plain Adam, AdamW or SGD to its fused kernels, in place, when its factory left
    the choice open: one kernel per step instead of a loop over parameters (Adam's step over
    the benchmark CNN: ~28 ms -> ~7 ms on a 2-core CPU)."""
    defaults = optimizer.defaults
    if (type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD) or optimizer.state
            or defaults.get("fused") is not None or defaults.get("foreach") is not None
            or defaults.get("differentiable")):
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not all(torch.is_floating_point(p) and p.device.type in ("cpu", "cuda") for p in params):
        return
    for group in [defaults, *optimizer.param_groups]:
        group["fused"] = True
    optimizer._step_supports_amp_scaling = True  # type: ignore[attr-defined]  # a private flag, as fused=True sets it
