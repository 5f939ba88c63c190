"""``optiflow reproduce RUN_ID``: re-run a tracked run from its logged configuration and check its metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optiflow.config import RunConfig
from optiflow.errors import OptiflowError
from optiflow.metrics import TIMING_METRICS
from optiflow.stored import placed, stored_config

if TYPE_CHECKING:
    from optiflow.run import Reporter

NOT_REPRODUCIBLE = {"compare": "a compare parent run; reproduce one of its child runs",
                    "search": "a search parent run; reproduce one of its trial runs",
                    "cross-validation": "a cross-validated trial; reproduce one of its fold runs"}


class MetricsDiffer(OptiflowError):
    """The reproduced run's metrics are not those of the original."""

    exit_code = 1


@dataclass
class Reproduction:
    original_run_id: str
    run_id: str
    original_status: str
    rows: list[tuple[str, float | None, float | None, bool]]

    @property
    def matches(self) -> bool:
        return all(match for *_, match in self.rows)


def original_config(run_id: str, tracking_uri: str | None, *, data_dir: str | None = None,
                    allow_download: bool = False) -> tuple[RunConfig, Any]:
    """The logged ``config.yaml`` of ``run_id`` (placed by the user's flags: see ``stored``) and the run itself."""
    from mlflow.exceptions import MlflowException

    from optiflow.tracking import client, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    mlflow_client = client(uri)
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        raise OptiflowError(f"no run '{run_id}' in the tracking store {uri}") from None
    kind = run.data.tags.get("optiflow.kind")
    if kind in NOT_REPRODUCIBLE:
        raise OptiflowError(f"run '{run_id}' is {NOT_REPRODUCIBLE[kind]}")
    values = stored_config(mlflow_client, run_id)
    experiment = mlflow_client.get_experiment(run.info.experiment_id).name
    values.update(experiment=experiment, run_name=f"reproduce {run.info.run_name or run_id[:8]}")
    values = placed(values, run_id, tracking_uri=uri, data_dir=data_dir, allow_download=allow_download)
    return RunConfig.from_dict(values), run


def reproduce(run_id: str, tracking_uri: str | None = None, *, device: str | None = None, rtol: float = 1e-5,
              atol: float = 1e-8, reporter: Reporter | None = None, tags: dict[str, str] | None = None,
              data_dir: str | None = None, allow_download: bool = False) -> Reproduction:
    """Train again with the original configuration and seed; compare every non-timing metric."""
    from optiflow.training import train

    for name, tolerance in (("rtol", rtol), ("atol", atol)):
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise OptiflowError(f"--{name} must be >= 0 and finite, got {tolerance}")
    config, original = original_config(run_id, tracking_uri, data_dir=data_dir, allow_download=allow_download)
    if device is not None:
        config = config.replace(device=device)
    result = train(config, reporter=reporter, log_model=False,
                   extra_tags={**(tags or {}), "optiflow.reproduces": run_id})
    from optiflow.tracking import client

    assert result.run_id is not None and result.tracking_uri is not None, "reproduce trains in one process"
    reproduced = client(result.tracking_uri).get_run(result.run_id).data.metrics
    rows = []
    for key in sorted(k for k in original.data.metrics if k not in TIMING_METRICS):
        before, after = original.data.metrics[key], reproduced.get(key)
        same = after is not None and math.isclose(before, after, rel_tol=rtol, abs_tol=atol)
        rows.append((key, before, after, same))
    return Reproduction(run_id, result.run_id, original.info.status, rows)
