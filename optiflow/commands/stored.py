"""A configuration read back from a tracking store, placed by the user who runs it.

A run's ``config.yaml`` may come from someone else's store (``reproduce``, ``--resume``). It
decides what is trained, never where optiflow reads or writes or whether it downloads: the
data folder and the tracking store are the user's flags (or their defaults), a dataset's
``path`` must stay inside that data folder, and downloads are off unless the user allows them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import PurePath
from typing import Any

from optiflow.config import brief, load_yaml
from optiflow.errors import OptiflowError

#: dataset options that name a file or folder to read
PATH_OPTIONS = ("path",)


def stored_config(mlflow_client: Any, run_id: str) -> dict[str, Any]:
    """Run ``run_id``'s ``config.yaml`` artifact, read with the checks of a ``--config`` file (a mapping, no
    duplicate keys, bounded size)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="optiflow-config-") as folder:
        try:
            path = mlflow_client.download_artifacts(run_id, "config.yaml", folder)
        except Exception:
            raise OptiflowError(f"run '{run_id}' has no config.yaml artifact: it was not logged by optiflow train") from None
        try:
            return load_yaml(path)
        except OptiflowError as exc:
            raise OptiflowError(f"run '{run_id}': its stored {str(exc).replace(str(path), 'config.yaml')}") from None


def placed(values: dict[str, Any], run_id: str, *, tracking_uri: str, data_dir: str | None,
           allow_download: bool) -> dict[str, Any]:
    """``values`` with the user's data folder and store, its dataset confined to that folder and downloads off."""
    from optiflow.config import ComponentSpec, RunConfig
    from optiflow.plugins import get_registry

    data_dir = data_dir or RunConfig.data_dir
    spec = ComponentSpec.parse(values.get("data") or RunConfig().data)
    options = dict(spec.options)
    for key in PATH_OPTIONS:
        if key in options:
            path = PurePath(str(options[key]))
            if path.is_absolute() or ".." in path.parts:
                raise OptiflowError(
                    f"run {run_id} reads {brief(str(options[key]))}, outside --data-dir: "
                    "a stored configuration may only read files under --data-dir"
                )
            options[key] = str(PurePath(data_dir) / path)
    declared = {option.name for option in get_registry().get("dataset", spec.name).options}
    if "download" in declared and not allow_download:
        options["download"] = "false"
    return {**values, "data": str(ComponentSpec(spec.name, options)), "data_dir": data_dir,
            "tracking_uri": tracking_uri}
