"""``optiflow reproduce RUN_ID``: re-run a tracked run from its logged configuration and check its metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optiflow import hookimpl, host
from optiflow.config import RunConfig
from optiflow.digest import DATA_TAG, WEIGHTS_TAG, largest_difference
from optiflow.errors import OptiflowError
from optiflow.metrics import TIMING_METRICS
from optiflow.stored import placed, stored_config
from optiflow.stores import run_imports

if TYPE_CHECKING:
    from optiflow.run import Reporter, Run

NOT_REPRODUCIBLE = {"compare": "a compare parent run; reproduce one of its child runs",
                    "search": "a search parent run; reproduce one of its trial runs",
                    "cross-validation": "a cross-validated trial; reproduce one of its fold runs"}


class MetricsDiffer(OptiflowError):
    """The reproduced run's metrics are not those of the original."""

    exit_code = 1


@dataclass
class Reproduction:
    """The original run against its re-run: metric by metric, and its final weights and data by hash."""

    original_run_id: str
    run_id: str
    original_status: str
    rows: list[tuple[str, float | None, float | None, bool]]
    weights: WeightsCheck | None = None

    @property
    def metrics_match(self) -> bool:
        return all(match for *_, match in self.rows)

    @property
    def matches(self) -> bool:
        """Every metric within tolerance, the same data, and the same weights bit for bit where promised."""
        return self.metrics_match and (self.weights is None or self.weights.acceptable)

    def check(self) -> None:
        """Raise :class:`MetricsDiffer` saying what differs (metrics, data, promised weights), if anything does."""
        differing = [row[0] for row in self.rows if not row[3]]
        if differing:
            raise MetricsDiffer(f"{len(differing)} of {len(self.rows)} metrics differ from run {self.original_run_id}: "
                                + ", ".join(differing))
        weights = self.weights
        if weights is not None and weights.same_data is False:
            raise MetricsDiffer(f"the re-run trained on other data than run {self.original_run_id} (its data hash "
                                "differs)")
        if weights is not None and not weights.acceptable:
            raise MetricsDiffer(f"the final weights differ from run {self.original_run_id}'s, although both ran "
                                "--deterministic on the same kind of device")

    def largest_metric_difference(self) -> tuple[str | None, float]:
        """The metric that moved most (absolute difference), ``inf`` for one the re-run lacks."""
        worst: tuple[str | None, float] = (None, 0.0)
        for key, before, after, _ in self.rows:
            difference = math.inf if before is None or after is None else abs(before - after)
            if worst[0] is None or difference > worst[1]:
                worst = (key, difference)
        return worst


@dataclass
class WeightsCheck:
    """The final weights' and the data's SHA-256 of both runs, and what may be expected of them.

    ``bit_for_bit`` is the promise: both runs ``--deterministic`` on the same kind of device. ``largest`` is
    the tensor that differs most when the original's weights are stored (its logged model), else None.
    """

    original: str | None
    reproduced: str | None
    bit_for_bit: bool
    original_data: str | None = None
    reproduced_data: str | None = None
    largest: tuple[str | None, float] | None = None

    @property
    def identical(self) -> bool | None:
        """Whether the final weights are identical bit for bit (None: the original logged no hash)."""
        return None if self.original is None else self.original == self.reproduced

    @property
    def same_data(self) -> bool | None:
        return None if self.original_data is None else self.original_data == self.reproduced_data

    @property
    def acceptable(self) -> bool:
        return self.same_data is not False and not (self.bit_for_bit and self.identical is False)


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
    """Train again with the original configuration and seed; compare every non-timing metric, the final
    weights' and the data's hashes, and (where the original logged its model) the weights themselves."""
    from optiflow.plugins import get_plugin_manager
    from optiflow.tracking import client
    from optiflow.training import train

    for name, tolerance in (("rtol", rtol), ("atol", atol)):
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise OptiflowError(f"--{name} must be >= 0 and finite, got {tolerance}")
    config, original = original_config(run_id, tracking_uri, data_dir=data_dir, allow_download=allow_download)
    if device is not None:
        config = config.replace(device=device)
    host.imports_done(ahead=run_imports(config.tracking_uri))  # a training command's: before its run exists
    keep = _FinalWeights()
    pm = get_plugin_manager()
    pm.register(keep, name=f"optiflow-reproduce-{id(keep):x}")
    try:
        result = train(config, pm=pm, reporter=reporter, log_model=False,
                       extra_tags={**(tags or {}), "optiflow.reproduces": run_id})
    finally:
        pm.unregister(keep)
    assert result.run_id is not None and result.tracking_uri is not None, "reproduce trains in one process"
    store = client(result.tracking_uri)
    again = store.get_run(result.run_id)
    reproduced = again.data.metrics
    rows = []
    for key in sorted(k for k in original.data.metrics if k not in TIMING_METRICS):
        before, after = original.data.metrics[key], reproduced.get(key)
        same = after is not None and math.isclose(before, after, rel_tol=rtol, abs_tol=atol)
        rows.append((key, before, after, same))
    before_tags, after_tags = original.data.tags, again.data.tags
    check = WeightsCheck(
        before_tags.get(WEIGHTS_TAG), after_tags.get(WEIGHTS_TAG),
        bit_for_bit=config.deterministic and original.data.params.get("deterministic") == "True"
        and original.data.params.get("device_type") == again.data.params.get("device_type"),
        original_data=before_tags.get(DATA_TAG), reproduced_data=after_tags.get(DATA_TAG))
    if check.identical is not True and keep.weights is not None:
        stored = _logged_weights(run_id, result.tracking_uri)
        if stored is not None:
            check.largest = largest_difference(stored, keep.weights)
    return Reproduction(run_id, result.run_id, original.info.status, rows, check)


class _FinalWeights:
    """Keeps a CPU copy of the re-run's final weights (``optiflow_run_end``)."""

    weights: dict[str, Any] | None = None

    @hookimpl
    def optiflow_run_end(self, run: Run, status: str) -> None:
        self.weights = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}


def _logged_weights(run_id: str, tracking_uri: str) -> dict[str, Any] | None:
    """The trained model's weights inside the original run's logged model, or None when it logged none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from optiflow.export import load_module

    current = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)  # what runs:/ resolves against
    try:
        state = load_module(f"runs:/{run_id}/model").state_dict()
    except (MlflowException, OSError, OptiflowError):
        return None
    finally:
        mlflow.set_tracking_uri(current)
    return {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
