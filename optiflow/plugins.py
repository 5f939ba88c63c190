"""The plugin manager: built-in plugins plus those found in the ``optiflow`` entry-point group."""

from __future__ import annotations

import importlib
from functools import lru_cache

import pluggy

from optiflow import hookspecs
from optiflow.errors import OptiflowError
from optiflow.registry import FAMILIES, Registry

ENTRY_POINT_GROUP = "optiflow"
DEFAULT_PLUGINS = (
    "optiflow_plugins.data",
    "optiflow_plugins.models",
    "optiflow_plugins.optimizers",
    "optiflow_plugins.regularizers",
    "optiflow_plugins.schedulers",
    "optiflow_plugins.initializers",
)
REGISTRATION_HOOKS = {
    "data": "optiflow_register_data",
    "model": "optiflow_register_models",
    "optimizer": "optiflow_register_optimizers",
    "regularizer": "optiflow_register_regularizers",
    "scheduler": "optiflow_register_schedulers",
    "initializer": "optiflow_register_initializers",
}


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager with built-in and installed plugins loaded."""
    pm = pluggy.PluginManager("optiflow")
    pm.add_hookspecs(hookspecs)
    load_plugins(pm)
    return pm


def load_plugins(pm: pluggy.PluginManager) -> None:
    """Register the built-ins, then every plugin of the ``optiflow`` entry-point group."""
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name.rsplit(".", 1)[-1])
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    """Every component of every plugin, built by calling the registration hooks once."""
    return build_registry(get_plugin_manager())


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Call each plugin's registration hooks with a ``register`` bound to that plugin."""
    registry = Registry()
    for family, hook_name in REGISTRATION_HOOKS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin = plugin_name(pm, impl.plugin)
            register = registry.registrar(FAMILIES[family][0], plugin)
            try:
                impl.function(register)
            except OptiflowError:
                raise
            except Exception as exc:
                raise OptiflowError(f"plugin '{plugin}' failed in {hook_name}: {exc}") from exc
    return registry


def plugin_name(pm: pluggy.PluginManager, plugin: object) -> str:
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))


def describe_plugins(pm: pluggy.PluginManager | None = None) -> list[dict[str, object]]:
    """Name, distribution, version and implemented hooks of every registered plugin."""
    from optiflow import __version__

    pm = pm or get_plugin_manager()
    distributions = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist = distributions.get(id(plugin))
        rows.append(
            {
                "name": name,
                "distribution": dist.project_name if dist else "optiflow (built-in)",
                "version": dist.version if dist else __version__,
                "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
            }
        )
    return rows
