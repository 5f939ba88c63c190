"""Checkpoints: the state at the end of the last completed epoch, saved as the run's
``checkpoint/last.pt`` artifact after epochs (at most every ``OPTIFLOW_CHECKPOINT_SECONDS``,
default 60, one file overwritten in place atomically on a local store) and when a run ends
KILLED or FAILED, so that ``optiflow train --resume RUN_ID`` continues it in the same MLflow
run, even after a SIGKILL.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optiflow import heartbeat
from optiflow.errors import OptiflowError, first_line, no_space
from optiflow.tracking import Tracker, retry

if TYPE_CHECKING:
    from optiflow.run import Run

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = 1
EVERY_ENV = "OPTIFLOW_CHECKPOINT_SECONDS"
EVERY_S = 60.0


def capture(run: Run) -> dict[str, Any]:
    """A CPU copy of everything that decides how training continues after ``run.epoch``."""
    import numpy as np
    import torch

    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "batches": run.batch_generator.get_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(np.random.get_state()),
    }
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
    scheduler = run.schedule.scheduler
    return _to_cpu(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": run.epoch,
            "step": run.step,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "regularizers": [_state_of(r) for r in run.regularizers],
            "history": {k: list(v) for k, v in run.history.items()},
            "rng": rng,
        }
    )


def restore(run: Run, state: dict[str, Any]) -> None:
    """Put ``run`` back in the state ``capture`` saw (random number generators: see ``restore_rng``)."""
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None and run.schedule.scheduler is not None:
            run.schedule.scheduler.load_state_dict(state["scheduler"])
        for regularizer, saved in zip(run.regularizers, state["regularizers"]):
            if saved is not None and hasattr(regularizer, "load_state_dict"):
                regularizer.load_state_dict(saved)
    except (KeyError, IndexError, TypeError, RuntimeError, ValueError) as exc:
        raise OptiflowError(f"the checkpoint does not fit this run's model or optimizer: {first_line(exc)}") from None
    run.epoch, run.step = int(state["epoch"]), int(state["step"])
    run.history = {k: list(v) for k, v in state["history"].items()}


def restore_rng(run: Run, state: dict[str, Any]) -> None:
    """Reset every random number generator training draws from to its state in the checkpoint."""
    import numpy as np
    import torch

    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    run.batch_generator.set_state(rng["batches"])
    random.setstate(_tuples(rng["python"]))
    np.random.set_state(_numpy_state(rng["numpy"], restore=True))
    if "cuda" in rng and run.device.type == "cuda" and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_periodically(run: Run) -> None:
    """After an epoch, when the last save is old enough: beat the run's heartbeat and save its
    checkpoint.  Child runs of a search or comparison (``run.artifacts`` off) only beat: nobody
    resumes them by hand, and a failed one still saves its checkpoint as it ends."""
    tracker = run.tracker
    if not isinstance(tracker, Tracker) or tracker.run_id is None or run.checkpoint is None:
        return  # the process that logs, once its run is open
    every = float(os.environ.get(EVERY_ENV) or EVERY_S)
    last = tracker.checkpoint_saved_at
    if last is not None and time.monotonic() - last < every:
        return
    heartbeat.beat(tracker)
    if run.artifacts:
        save(tracker, run.checkpoint)
    else:
        tracker.checkpoint_saved_at = time.monotonic()


def save(tracker: Tracker, state: dict[str, Any]) -> None:
    """Write ``state`` as the run's ``checkpoint/last.pt`` artifact: on a local store by an atomic rename
    over the last one (a kill mid-write leaves the previous checkpoint whole), else by logging it."""
    import torch

    folder = _local_checkpoint_folder(tracker)
    if folder is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)  # whole in memory first: a failing write is an OSError, not torch's
        partial = folder / f".{CHECKPOINT_FILE}.{os.getpid()}.partial"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as handle:
                handle.write(buffer.getbuffer())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, folder / CHECKPOINT_FILE)
        except OSError as exc:
            partial.unlink(missing_ok=True)  # the last whole checkpoint stays as it was
            raise no_space(exc, folder, needed=len(buffer.getbuffer())) or exc from None
    else:
        with tempfile.TemporaryDirectory(prefix="optiflow-checkpoint-") as scratch:
            path = Path(scratch) / CHECKPOINT_FILE
            try:
                torch.save(state, path)
            except (OSError, RuntimeError) as exc:
                raise no_space(exc, scratch) or exc from None
            tracker.log_artifact(path, CHECKPOINT_DIR)
    tracker.checkpoint_saved_at = time.monotonic()


def _local_checkpoint_folder(tracker: Tracker) -> Path | None:
    """The run's ``checkpoint`` artifact folder when the artifacts live in a local folder."""
    from urllib.parse import unquote, urlparse

    uri = retry(tracker.client.get_run, tracker.run_id).info.artifact_uri
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)) / CHECKPOINT_DIR
    if not parsed.scheme:
        return Path(uri) / CHECKPOINT_DIR
    return None


def load(client: Any, run_id: str) -> dict[str, Any]:
    """The checkpoint of run ``run_id``, loaded with ``weights_only=True`` (no code runs from the file)."""
    import torch

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line on stderr, even when refused
    with tempfile.TemporaryDirectory(prefix="optiflow-checkpoint-") as folder:
        try:
            path = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}", folder)
        except Exception:
            raise OptiflowError(
                f"run {run_id} has no checkpoint to resume from (one is saved when a run is interrupted or fails "
                "after at least one epoch)"
            ) from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise OptiflowError(f"the checkpoint of run {run_id} cannot be read: {first_line(exc)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise OptiflowError(f"the checkpoint of run {run_id} is not an optiflow checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def check_resumable(client: Any, uri: str, run_id: str) -> Any:
    """The info of run ``run_id`` if it can be resumed (it ended KILLED or FAILED, or it is RUNNING but
    its process is gone: see ``heartbeat``), else OptiflowError."""
    try:
        run = retry(client.get_run, run_id)
    except Exception:
        raise OptiflowError(f"no run {run_id} in the tracking store {uri}") from None
    info = run.info
    if info.status == "FINISHED":
        raise OptiflowError(f"run {run_id} already FINISHED; there is nothing to resume")
    if info.status == "RUNNING" and heartbeat.gone(run.data.tags) is None:
        raise OptiflowError(f"run {run_id} is RUNNING and its process may still be training it; "
                            "only a KILLED or FAILED run, or a RUNNING one whose process is gone, can be resumed")
    if info.status not in ("KILLED", "FAILED", "RUNNING"):
        raise OptiflowError(f"run {run_id} is {info.status}; only a KILLED or FAILED run can be resumed")
    return info


def resumable_config(client: Any, uri: str, run_id: str) -> dict[str, Any]:
    """The logged configuration of run ``run_id`` (with its experiment and run name), if it can be resumed."""
    import yaml

    info = check_resumable(client, uri, run_id)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="optiflow-config-") as folder:
        try:
            path = client.download_artifacts(run_id, "config.yaml", folder)
            values = yaml.safe_load(Path(path).read_text())
        except Exception:
            raise OptiflowError(f"run {run_id} has no readable config.yaml artifact; it was not made by optiflow") from None
    experiment = retry(client.get_experiment, info.experiment_id)
    return {**values, "experiment": experiment.name, "run_name": info.run_name}


def _state_of(regularizer: Any) -> Any:
    return regularizer.state_dict() if hasattr(regularizer, "state_dict") else None


def _to_cpu(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _numpy_state(state: Any, restore: bool = False) -> Any:
    """numpy's RNG state with its key array as a tensor (loadable with weights_only) and back."""
    import numpy as np
    import torch

    name, key, position, has_gauss, cached = state
    if restore:
        return name, key.numpy().astype(np.uint32), int(position), int(has_gauss), float(cached)
    return name, torch.from_numpy(key.astype(np.int64)), int(position), int(has_gauss), float(cached)
