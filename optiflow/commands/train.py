"""``optiflow train``: one training tracked as one MLflow run (:mod:`optiflow.training`), and the configuration
``--resume`` continues.

:func:`train` is also the Python entry point (tests and scripts call it).
"""

from __future__ import annotations

from typing import Any

from optiflow import checkpoints, host
from optiflow.config import RunConfig
from optiflow.distributed import is_main_process
from optiflow.export import register_model
from optiflow.run import RunResult
from optiflow.stores import run_imports
from optiflow.tracking import client, resolve_tracking_uri, retry
from optiflow.training import train

__all__ = ["register_model", "resume_config", "train", "train_command"]


def train_command(config: RunConfig, **options: Any) -> RunResult:
    """:func:`train` as ``optiflow train`` runs it: what its run imports first is imported, and frozen unscanned,
    before anything of the run exists (:func:`optiflow.host.imports_done`; a torchrun worker but rank 0 logs
    nothing, and imports no MLflow)."""
    host.imports_done(ahead=run_imports(config.tracking_uri) if is_main_process() else ("torch._dynamo",))
    return train(config, **options)


def resume_config(run_id: str, tracking_uri: str | None = None, *, data_dir: str | None = None,
                  allow_download: bool = False, **overrides: object) -> RunConfig:
    """The logged configuration of KILLED or FAILED run ``run_id``, for ``train(config, resume=run_id)``.

    ``overrides`` may only change how the run is computed (``device``), never what is trained;
    where it reads and writes is the user's (``stored.placed``).
    """
    from optiflow.stored import placed, stored_config

    uri = resolve_tracking_uri(tracking_uri)
    store = client(uri)
    info = checkpoints.check_resumable(store, uri, run_id)
    values = {**stored_config(store, run_id), "experiment": retry(store.get_experiment, info.experiment_id).name,
              "run_name": info.run_name}
    values = placed(values, run_id, tracking_uri=uri, data_dir=data_dir, allow_download=allow_download)
    return RunConfig.from_dict({**values, **{k: v for k, v in overrides.items() if v is not None}})
