"""The content key of a run: what decides its result, hashed, so that a finished run is never trained twice
(:mod:`optiflow.reuse` finds the run holding a key).

The key (tag ``optiflow.key``) is the SHA-256 of: every component but the dataset, with its typed options
(defaults filled in) and the distribution and version of the plugin that registered it; every run setting but
those in :data:`NOT_IN_KEY`; the kind of device the run trains on and its process count; the data's content
(:func:`optiflow.digest.source_digest`: its arrays and what the dataset says of them, never its name, options or
path); and the versions of optiflow, torch and every plugin implementing a per-run hook.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import TYPE_CHECKING

from optiflow.plan import Plan
from optiflow.registry import Nested
from optiflow.slots import SLOT_BY_KEY

if TYPE_CHECKING:
    import torch

    from optiflow.plugins import PluginManager

KEY_TAG = "optiflow.key"
#: what a repr holding an object's address looks like (``<function relu at 0x7f...>``): not the same in two processes
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
#: bumped when what the key holds changes, so that no older key matches a newer one by accident
KEY_FORMAT = 2
#: settings that change where a run is logged, what it is called, where its files are read from (their content
#: is in the key) or how fast it goes, never what it computes; ``lr`` is the optimizer's ``lr`` option, and the
#: device is in the key as the kind it resolves to
NOT_IN_KEY = frozenset({"experiment", "run_name", "tracking_uri", "data_dir", "pin_memory", "log_step_loss", "lr",
                        "device"})
#: the hooks that run inside a training: a plugin implementing one may change what it computes
PER_RUN_HOOKS = frozenset({"optiflow_check_run", "optiflow_metric_names", "optiflow_epoch_metric_names",
                           "optiflow_run_start", "optiflow_epoch_start",
                           "optiflow_train_batch", "optiflow_penalty", "optiflow_after_backward",
                           "optiflow_after_step", "optiflow_validation_end", "optiflow_epoch_end", "optiflow_run_end"})


def run_key(resolved: Plan, data: str, device: torch.device, world_size: int = 1,
            pm: PluginManager | None = None) -> str:
    """The content key of a run of ``resolved`` on the data whose :func:`~optiflow.digest.source_digest` is
    ``data``, on ``device`` in ``world_size`` processes (see the module's docstring)."""
    import torch

    from optiflow import __version__
    from optiflow.plugins import get_plugin_manager

    pm = pm or get_plugin_manager()
    components = {key: {"name": component.name, "options": options, "plugin": _origin(pm, component.plugin)}
                  for key, (component, options) in resolved.components() if key != "data"}
    settings = {key: value for key, value in resolved.config.to_dict().items()
                if key not in NOT_IN_KEY and key not in SLOT_BY_KEY}
    hooks = {getattr(plugin, "__name__", type(plugin).__qualname__): _origin(pm, name)  # never a name pluggy made of an id
             for name, plugin in pm.list_name_plugin()
             if plugin is not None and "@" not in name
             and any(caller.name in PER_RUN_HOOKS for caller in pm.get_hookcallers(plugin) or [])}
    content = {"format": KEY_FORMAT, "components": components, "settings": settings, "device": device.type,
               "world_size": world_size, "data": data,
               "versions": {"optiflow": __version__, "torch": torch.__version__, "plugins": hooks}}
    unstable: list[str] = []

    def canonical(value: object) -> object:
        """A value JSON cannot write, as what it means: a nested component by name, options and plugin; anything
        else by its ``repr`` unless that holds a memory address (then the run gets a key no other run has)."""
        if isinstance(value, Nested):
            return {"name": value.name, "options": value.options, "plugin": _origin(pm, value.component.plugin)}
        text = repr(value)
        if _ADDRESS.search(text):
            unstable.append(text)
        return text

    text = json.dumps(content, sort_keys=True, default=canonical, separators=(",", ":"))
    if unstable:  # keyed by an object's identity: no other process could find this run, so none is promised
        text += uuid.uuid4().hex
    return hashlib.sha256(text.encode()).hexdigest()


def _origin(pm: PluginManager, plugin: str) -> str:
    """``distribution version`` of the plugin named ``plugin``."""
    return " ".join(pm.distribution(plugin))
