"""Checkpoints: the state at the end of the last completed epoch, saved as the run's
``checkpoint/last.pt`` artifact after epochs and when a run ends KILLED or FAILED, so that
``optiflow train --resume RUN_ID`` continues it in the same MLflow run, even after a SIGKILL.

A run's metrics reach the store only right after a checkpoint that covers them (the checkpoint
keeps the metrics still queued, written again on resume if the kill came between the two), so
the store never holds an epoch that the resume trains again: every step appears once. A
checkpoint is saved every ``OPTIFLOW_CHECKPOINT_SECONDS`` when set, else as often as the
metrics are written (2 s) but never taking more than 1/``COST_SHARE`` of the training time:
one file overwritten in place atomically on a local store.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optiflow import heartbeat
from optiflow.errors import OptiflowError, first_line, no_space
from optiflow.stores import quiet_artifact_downloads
from optiflow.tracking import Tracker, retry

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import RunInfo

    from optiflow.run import Run

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = 1
RESCUE_DIR = "optiflow-rescued"
EVERY_ENV = heartbeat.CHECKPOINT_EVERY_ENV
#: a checkpoint waits at least this many times as long as the last one took to save
COST_SHARE = 20


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
    state: dict[str, object] = {
        "format": CHECKPOINT_FORMAT,
        "epoch": run.epoch,
        "step": run.step,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "regularizers": [_state_of(r) for r in run.regularizers],
        "history": {k: list(v) for k, v in run.history.items()},
        "metrics": run.tracker.queued() if isinstance(run.tracker, Tracker) else [],
        "rng": rng,
    }
    return {key: _to_cpu(value) for key, value in state.items()}


def restore(run: Run, state: dict[str, Any]) -> None:
    """Put ``run`` back in the state ``capture`` saw (random number generators: see ``restore_rng``), once
    the whole checkpoint is known to fit it (``check``): a refusal happens before the run reopens."""
    check(run, state)
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
    run.epoch, run.step = state["epoch"], state["step"]
    run.history = {k: list(v) for k, v in state["history"].items()}


#: optimizer state entries that have their parameter's shape (Adam's moments, SGD's momentum, ...)
PARAM_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                          "sum", "grad_avg", "prev", "ax", "exp_inf"})


def check(run: Run, state: dict[str, Any]) -> None:
    """Refuse (OptiflowError) a checkpoint that cannot continue ``run``: counters that are not integers in range,
    weights of another shape or dtype, optimizer moments of another shape, random generator states that the
    generators would not take. Nothing of ``run`` or of the global generators changes here."""
    import torch

    def refuse(why: str) -> OptiflowError:
        return OptiflowError(f"the checkpoint does not fit this run: {why}")

    for key, limit in (("epoch", run.config.epochs), ("step", None)):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (limit is not None and value > limit):
            bound = f" in [0, {limit}]" if limit is not None else " >= 0"
            raise refuse(f"its {key} must be an integer{bound}, got {str(value)[:40]!r}")
    history = state.get("history")
    if not isinstance(history, dict) or not all(isinstance(v, list) and all(
            isinstance(x, (int, float)) for x in v) for v in history.values()):
        raise refuse("its learning curves are not lists of numbers")
    queued = state.get("metrics", [])
    if not isinstance(queued, list) or not all(isinstance(m, (list, tuple)) and len(m) == 4 and isinstance(m[0], str)
                                               and all(isinstance(x, (int, float)) for x in m[1:]) for m in queued):
        raise refuse("its queued metrics are not (key, value, timestamp, step)")
    expected = run.model.state_dict()
    weights = state.get("model")
    if not isinstance(weights, dict) or set(weights) != set(expected):
        extra = sorted(set(weights) - set(expected)) if isinstance(weights, dict) else []
        missing = sorted(set(expected) - set(weights)) if isinstance(weights, dict) else sorted(expected)
        raise refuse(f"its model has other layers (only in the checkpoint: {', '.join(extra[:3]) or '-'}; "
                     f"only in the model: {', '.join(missing[:3]) or '-'})")
    for name, tensor in expected.items():
        saved = weights[name]
        if not isinstance(saved, torch.Tensor) or saved.shape != tensor.shape or saved.dtype != tensor.dtype:
            what = f"{tuple(saved.shape)} {saved.dtype}" if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise refuse(f"its weight {name} is {what}, the model's is {tuple(tensor.shape)} {tensor.dtype}")
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    per_param = state.get("optimizer", {}).get("state", {}) if isinstance(state.get("optimizer"), dict) else None
    if not isinstance(per_param, dict):
        raise refuse("its optimizer state is not a mapping")
    for index, entries in per_param.items():
        for key, value in (entries.items() if isinstance(entries, dict) else ()):
            if key in PARAM_SHAPED and isinstance(value, torch.Tensor) and isinstance(index, int) \
                    and index < len(params) and value.shape != params[index].shape:
                raise refuse(f"its optimizer's {key} of parameter {index} is {tuple(value.shape)}, "
                             f"the parameter is {tuple(params[index].shape)}")
    try:
        _check_rng(run, state["rng"])
    except (KeyError, IndexError, TypeError, AttributeError, RuntimeError, ValueError) as exc:
        raise refuse(f"its random generator states cannot be restored ({first_line(exc)})") from None


def _check_rng(run: Run, rng: dict[str, Any]) -> None:
    """Set every saved generator state on a scratch generator of the same kind (raises when one would not take it)."""
    import numpy as np
    import torch

    for key in ("torch", "batches"):
        if not isinstance(rng[key], torch.Tensor) or rng[key].dtype != torch.uint8:
            raise TypeError(f"the {key} state is not a byte tensor")
    torch.Generator().set_state(rng["torch"])
    type(run.batch_generator)().set_state(rng["batches"])
    random.Random().setstate(_tuples(rng["python"]))
    np.random.RandomState().set_state(_numpy_state(rng["numpy"], restore=True))


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


def save_periodically(run: Run, flush_every: float) -> None:
    """After an epoch: when the last save is old enough, save the run's checkpoint, then write the metrics
    it covers.  Search trials and folds (``run.wants_artifacts`` off) write their metrics every
    ``flush_every`` seconds without a checkpoint: nobody resumes them by hand, and a failed one still saves
    its checkpoint as it ends."""
    tracker = run.tracking
    if not run.wants_artifacts or not isinstance(tracker, Tracker) or tracker.run_id is None or run.checkpoint is None:
        tracker.flush_due(flush_every)
        return
    every = heartbeat.seconds(EVERY_ENV, None)
    if every is None:
        every = max(flush_every, COST_SHARE * tracker.checkpoint_cost)
    last = tracker.checkpoint_saved_at
    if last is not None and time.monotonic() - last < every:
        return
    started = time.monotonic()
    save(tracker, run.checkpoint)
    tracker.checkpoint_cost = time.monotonic() - started
    tracker.flush()


def relog(tracker: Tracker, state: dict[str, Any]) -> None:
    """Write the metrics that were queued when the checkpoint was taken and that the store lacks (the process
    was killed between the checkpoint and the write that follows it)."""
    from mlflow.entities import Metric

    queued = [Metric(key, value, timestamp, step) for key, value, timestamp, step in state.get("metrics", [])]
    missing = []
    for key in dict.fromkeys(m.key for m in queued):
        stored = {(m.step, m.timestamp) for m in retry(tracker.client.get_metric_history, tracker.run_id, key)}
        missing += [m for m in queued if m.key == key and (m.step, m.timestamp) not in stored]
    for start in range(0, len(missing), 1000):
        retry(tracker.client.log_batch, tracker.run_id, metrics=missing[start:start + 1000])


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


def keep_locally(run_id: str, state: dict[str, Any], config_yaml: str) -> Path:
    """Write the checkpoint and configuration of a run whose store was lost to ``./optiflow-rescued/RUN_ID``
    (under the temporary folder when the working folder cannot be written); returns that folder (relative to
    the working folder when under it)."""
    import torch

    failure: OSError | None = None
    for base in (Path("."), Path(tempfile.gettempdir())):
        folder = base / RESCUE_DIR / run_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(state, folder / CHECKPOINT_FILE)
            (folder / "config.yaml").write_text(config_yaml)
            return folder
        except OSError as exc:
            failure = exc
    raise OptiflowError(f"the checkpoint could not be kept either: {first_line(failure or OSError())}")


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


def load(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """The checkpoint of run ``run_id``, loaded with ``weights_only=True`` (no code runs from the file)."""
    import torch

    quiet_artifact_downloads()
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
        except pickle.UnpicklingError as exc:  # torch's message advises an unsafe load: not passed on
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = f" ({found.group(1)})" if found else ""
            raise OptiflowError(f"the checkpoint of run {run_id} cannot be read: it holds Python objects{what} that "
                                "only an unsafe load would build, and optiflow never loads a file unsafely") from None
        except Exception as exc:
            raise OptiflowError(f"the checkpoint of run {run_id} cannot be read: {first_line(exc)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise OptiflowError(f"the checkpoint of run {run_id} is not an optiflow checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def check_resumable(client: MlflowClient, uri: str, run_id: str) -> RunInfo:
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


def _state_of(regularizer: object) -> object:
    return regularizer.state_dict() if hasattr(regularizer, "state_dict") else None


def _to_cpu(value: object) -> object:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _tuples(value: list[object] | tuple[object, ...]) -> tuple[object, ...]:
    """``value`` with its lists, nested ones included, as tuples (``random.setstate`` takes no list)."""
    return tuple(_tuples(v) if isinstance(v, (list, tuple)) else v for v in value)


def _numpy_state(state: Any, restore: bool = False) -> Any:
    """numpy's RNG state with its key array as a tensor (loadable with weights_only) and back."""
    import numpy as np
    import torch

    name, key, position, has_gauss, cached = state
    if restore:
        return name, key.numpy().astype(np.uint32), int(position), int(has_gauss), float(cached)
    return name, torch.from_numpy(key.astype(np.int64)), int(position), int(has_gauss), float(cached)
