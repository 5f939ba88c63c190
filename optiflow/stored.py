"""A configuration read back from a tracking store, placed by the user who runs it.

A run's ``config.yaml`` may come from someone else's store (``reproduce``, ``--resume``). It
decides what is trained, never where optiflow reads or writes or whether it downloads: the
data folder and the tracking store are the user's flags (or their defaults), a dataset's
``path`` must stay inside that data folder, and downloads are off unless the user allows them.
The user's own ``--data-dir`` grants the files under it, wherever the stored path points (``../wine.csv``
read from the working folder, as the original training read it): :func:`resume_command` prints the
command that grants what the run needs.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from optiflow.config import brief, load_yaml
from optiflow.errors import OptiflowError
from optiflow.stores import quiet_artifact_downloads

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from optiflow.config import RunConfig

#: dataset options that name a file or folder to read
PATH_OPTIONS = ("path",)


def stored_config(mlflow_client: MlflowClient, run_id: str) -> dict[str, Any]:
    """Run ``run_id``'s ``config.yaml`` artifact, read with the checks of a ``--config`` file (a mapping, no
    duplicate keys, bounded size)."""
    quiet_artifact_downloads()
    with tempfile.TemporaryDirectory(prefix="optiflow-config-") as folder:
        try:
            path = mlflow_client.download_artifacts(run_id, "config.yaml", folder)
        except Exception:
            raise OptiflowError(f"run '{run_id}' has no config.yaml artifact: {missing_config(mlflow_client, run_id)}"
                                ) from None
        try:
            return load_yaml(path)
        except OptiflowError as exc:
            raise OptiflowError(f"run '{run_id}': its stored {str(exc).replace(str(path), 'config.yaml')}") from None


def missing_config(mlflow_client: MlflowClient, run_id: str) -> str:
    """Why a run has no stored configuration: a search trial or fold logs it only with --child-artifacts."""
    try:
        parent = mlflow_client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    except Exception:
        parent = None
    if parent:
        return (f"it is a child of run '{parent}', and search trials and folds log it only with --child-artifacts; "
                "reproduce the search's refit run, or search again with --child-artifacts")
    return "it was not logged by optiflow train, or it stopped as it started"


def placed(values: dict[str, Any], run_id: str, *, tracking_uri: str, data_dir: str | None,
           allow_download: bool) -> dict[str, Any]:
    """``values`` with the user's data folder and store, its dataset confined to that folder and downloads off."""
    from optiflow.config import ComponentSpec, RunConfig
    from optiflow.plugins import get_registry

    granted = data_dir is not None
    data_dir = data_dir or RunConfig.data_dir
    spec = ComponentSpec.parse(values.get("data") or RunConfig().data)
    options = dict(spec.options)
    for key in PATH_OPTIONS:
        if key in options:
            path = PurePath(str(options[key]))
            file = _inside(str(path), data_dir) if granted else None
            if file is not None:
                options[key] = file
            elif path.is_absolute() or ".." in path.parts:
                raise OptiflowError(
                    f"run {run_id} reads {brief(str(options[key]))}, outside --data-dir {data_dir}: a stored "
                    f"configuration may only read files under --data-dir; if the file is yours, grant its folder: "
                    f"--data-dir {shlex.quote(os.path.dirname(os.path.abspath(os.path.expanduser(str(path)))))}"
                )
            else:
                options[key] = str(PurePath(data_dir) / path)
    declared = {option.name for option in get_registry().get("dataset", spec.name).options}
    if "download" in declared and not allow_download:
        options["download"] = "false"
    return {**values, "data": str(ComponentSpec(spec.name, options)), "data_dir": data_dir,
            "tracking_uri": tracking_uri}


def resume_command(config: RunConfig, run_id: str) -> str:
    """The command that resumes run ``run_id`` (trained with ``config``) from this working folder."""
    folder = data_dir_needed(config)
    return shlex.join(["optiflow", "train", "--resume", run_id, *(["--data-dir", folder] if folder else [])])


#: a search's trials and folds are not resumed with ``train --resume``: the search is run again
SEARCH_ROLES = ("search-trial", "cv-fold")


def resume_hint(config: RunConfig, run_id: str, role: str) -> str:
    """How to go on after run ``run_id`` was stopped with a checkpoint: ``train --resume``, or for a search's trial
    or fold (``role``), the same search again."""
    if role in SEARCH_ROLES:
        return ("to go on, run the same search command again (the same --storage and --study-name, if given): "
                "its finished trials are reused")
    return f"resume with: {resume_command(config, run_id)}"


def data_dir_warning(config: RunConfig) -> Callable[[str], None] | None:
    """What to say once a run with ``config`` is open when its resume or reproduction will need a ``--data-dir``
    (None: nothing to say)."""
    folder = data_dir_needed(config)
    if folder is None:
        return None

    def warn(run_id: str) -> None:
        print(f"Warning: the data is read from outside the default data folder: resume or reproduce run {run_id} "
              f"with --data-dir {shlex.quote(folder)}", file=sys.stderr, flush=True)

    return warn


def data_dir_needed(config: RunConfig) -> str | None:
    """The ``--data-dir`` that a resume or reproduction of a run with ``config`` must be given to read its data
    (None: the default data folder serves): the run's own data folder, or the folder of a file outside it."""
    from optiflow.config import RunConfig

    default = RunConfig.data_dir
    path = next((str(config.data.options[key]) for key in PATH_OPTIONS if key in config.data.options), None)
    if path is None:
        return None if _absolute(config.data_dir) == _absolute(default) else _absolute(config.data_dir)
    file = Path(path).expanduser()
    found = _absolute(file if file.exists() else Path(config.data_dir) / path)
    if not (PurePath(path).is_absolute() or ".." in PurePath(path).parts) and \
            found == _absolute(Path(default) / path):
        return None
    inside = _inside(path, config.data_dir)
    return _absolute(config.data_dir) if inside == found else os.path.dirname(found)


def _inside(path: str, data_dir: str) -> str | None:
    """Where a dataset reads ``path`` (as given, then under ``data_dir``) if that lies under ``data_dir``."""
    root = _absolute(data_dir)
    for candidate in (Path(path).expanduser(), Path(data_dir) / path):
        absolute = _absolute(candidate)
        if os.path.commonpath([absolute, root]) == root:
            return absolute
    return None


def _absolute(path: str | Path) -> str:
    """``path`` made absolute and normalized, without resolving links (a linked data folder stays itself)."""
    return os.path.abspath(os.path.expanduser(str(path)))
