"""The plugin manager: built-in plugins plus those found in the ``optiflow`` entry-point group.

Every plugin is loaded, registered and asked for its components on its own: one
that fails to import, raises in a hook, or registers a name that is already
taken is reported in one warning line and dropped with everything it
registered, so the rest keeps working.  Environment switches:

- ``OPTIFLOW_LOAD_PLUGINS=a,b``: load only these external plugins (empty: none).
- ``OPTIFLOW_DISABLE_PLUGINS=a,b``: block built-in or external plugins by name
  (the CLI's ``--disable-plugin NAME`` adds to it).
- ``OPTIFLOW_STRICT_PLUGINS=1``: a broken plugin is an error, not a warning.
- ``OPTIFLOW_TRACE_HOOKS=1``: print every hook call with its plugins and time to stderr.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from optiflow import hookspecs
from optiflow.errors import OptiflowError, first_line
from optiflow.hooktrace import hook_tracer, tracing
from optiflow.registry import Registry, plugin_key
from optiflow.slots import FAMILIES
from optiflow.values import env_flag

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    import click

ENTRY_POINT_GROUP = "optiflow"
DEFAULT_PLUGINS = (
    "optiflow_plugins.datasets",
    "optiflow_plugins.normalizers",
    "optiflow_plugins.augmentations",
    "optiflow_plugins.models",
    "optiflow_plugins.optimizers",
    "optiflow_plugins.regularizers",
    "optiflow_plugins.mixing",
    "optiflow_plugins.schedulers",
    "optiflow_plugins.initializers",
    "optiflow_plugins.diagnostics",
)
COMMANDS_HOOK = "optiflow_register_commands"
BUILTIN_DISTRIBUTION = "optiflow"
REGISTERED_IN_CODE = ("(registered in code)", "")


@dataclass(frozen=True)
class PluginSelection:
    """Which plugins may load: external ones limited to ``load`` (None: all), none of ``disabled``."""

    load: frozenset[str] | None = None
    disabled: frozenset[str] = frozenset()

    @classmethod
    def from_environment(cls, extra_disabled: Iterable[str] = ()) -> PluginSelection:
        load = os.environ.get("OPTIFLOW_LOAD_PLUGINS")
        disabled = _names(os.environ.get("OPTIFLOW_DISABLE_PLUGINS", "")) | set(extra_disabled)
        return cls(None if load is None else frozenset(_names(load)), frozenset(disabled))

    def allows(self, *names: str) -> bool:
        """Whether an external plugin known by any of ``names`` (entry point, distribution) may load."""
        keys = {plugin_key(n) for n in names}
        if keys & self.disabled:
            return False
        return self.load is None or bool(keys & self.load)


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used, and why (one line)."""

    plugin: str
    distribution: str
    version: str
    error: str

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' ({self.distribution} {self.version})"


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus what optiflow shows about plugins: distributions, failures, blocks.

    The registry and the plugin CLI commands are built from it on first use and
    rebuilt after :func:`registered_plugin` changes the set of plugins.
    """

    def __init__(self, selection: PluginSelection = PluginSelection()) -> None:
        super().__init__("optiflow")
        self.add_hookspecs(hookspecs)
        self.selection = selection
        self.distributions: dict[str, tuple[str, str]] = {}
        self.failures: list[PluginFailure] = []
        self.blocked: list[tuple[str, str, str]] = []
        self._registry: Registry | None = None
        self._commands: dict[str, click.Command] | None = None
        self.command_owners: dict[str, str] = {}
        if tracing():
            self.add_hookcall_monitoring(*hook_tracer())

    @property
    def registry(self) -> Registry:
        """Every component of every plugin, built by calling the registration hooks once."""
        if self._registry is None:
            self._registry = build_registry(self)
        return self._registry

    def commands(self, reserved: Iterable[str] = ()) -> dict[str, click.Command]:
        """The CLI subcommands plugins add through ``optiflow_register_commands``; a name in
        ``reserved`` (the built-in commands, passed by the CLI) rejects the plugin adding it."""
        if self._commands is None:
            self._commands = build_commands(self, reserved=reserved)
        return self._commands

    def distribution(self, name: str) -> tuple[str, str]:
        """(distribution, version) a plugin came from; built-ins and objects registered in code are optiflow's."""
        from optiflow import __version__

        return self.distributions.get(name, (BUILTIN_DISTRIBUTION, __version__))

    def reject(self, name: str, error: str, plugin: object = None,
               distribution: tuple[str, str] | None = None) -> None:
        """Drop a broken plugin with all it registered; warn once, or raise under OPTIFLOW_STRICT_PLUGINS."""
        failure = PluginFailure(name, *(distribution or self.distribution(name)), first_line(error) or "failed")
        if env_flag("OPTIFLOW_STRICT_PLUGINS"):
            raise OptiflowError(f"{failure} is broken: {failure.error} (OPTIFLOW_STRICT_PLUGINS is set)")
        self.failures.append(failure)
        print(f"Warning: {failure} skipped: {failure.error}", file=sys.stderr, flush=True)
        if plugin is not None and self.is_registered(plugin):
            self.unregister(plugin)
        if self._registry is not None:
            self._registry.remove_plugin(name)
            self._registry.skipped.append(name)
        if self._commands is not None:
            for command in [c for c, owner in self.command_owners.items() if owner == name]:
                del self._commands[command]

    def warn(self, name: str, message: str) -> None:
        """One warning line about a plugin that stays loaded; an error under OPTIFLOW_STRICT_PLUGINS."""
        distribution, version = self.distribution(name)
        if env_flag("OPTIFLOW_STRICT_PLUGINS"):
            raise OptiflowError(f"plugin '{name}' ({distribution} {version}): {message} (OPTIFLOW_STRICT_PLUGINS is set)")
        print(f"Warning: plugin '{name}' ({distribution} {version}): {message}", file=sys.stderr, flush=True)

    def invalidate(self) -> None:
        """Forget the built registry and commands (after plugins were added or removed)."""
        self._registry = None
        self._commands = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager for the current plugin selection (env vars and --disable-plugin)."""
    global _manager
    selection = PluginSelection.from_environment(_disabled_by_cli)
    with _loading:
        if _manager is None or _manager.selection != selection:
            _manager = load_plugins(PluginManager(selection))
        return _manager


def get_registry() -> Registry:
    """Every component of every loaded plugin."""
    return get_plugin_manager().registry


def disable_plugins(names: Iterable[str]) -> None:
    """Block plugins by name for this process on top of OPTIFLOW_DISABLE_PLUGINS (``--disable-plugin``)."""
    global _disabled_by_cli
    _disabled_by_cli = frozenset(plugin_key(n) for n in names)


def load_plugins(pm: PluginManager) -> PluginManager:
    """Register the built-ins, then every allowed plugin of the ``optiflow`` entry-point group."""
    from optiflow import __version__

    for module_name in DEFAULT_PLUGINS:
        name = module_name.rsplit(".", 1)[-1]
        builtin = (BUILTIN_DISTRIBUTION, __version__)
        if name in pm.selection.disabled:
            pm.set_blocked(name)
            pm.blocked.append((name, *builtin))
            continue
        _add(pm, name, builtin, functools.partial(importlib.import_module, module_name))
    for entry_point in _entry_points():
        dist = entry_point.dist
        origin = (dist.metadata["Name"], dist.version) if dist is not None else ("unknown distribution", "?")
        if not pm.selection.allows(entry_point.name, origin[0]):
            pm.blocked.append((entry_point.name, *origin))
            continue
        _add(pm, entry_point.name, origin, entry_point.load)
    return pm


def build_registry(pm: PluginManager) -> Registry:
    """Ask each plugin in turn for its components; a plugin that fails is dropped with all it registered."""
    registry = Registry()
    for name, plugin in list(pm.list_name_plugin()):
        for family in FAMILIES:
            hook_name = family.hook
            try:
                _call_one(pm, hook_name, plugin, register=registry.registrar(family.name, name))
            except Exception as exc:
                registry.remove_plugin(name)
                pm.reject(name, _failure_text(exc, hook_name), plugin)
                break
        for clash in [line for owner, line in registry.clashes if owner == name]:
            pm.warn(name, clash)
    registry.skipped = [failure.plugin for failure in pm.failures]
    return registry


def build_commands(pm: PluginManager, reserved: Iterable[str] = ()) -> dict[str, click.Command]:
    """Each plugin adds its commands to a group of its own, so clashes and failures stay its own."""
    import click

    commands: dict[str, click.Command] = {}
    owners = {name: "optiflow" for name in reserved}
    for name, plugin in list(pm.list_name_plugin()):
        staging = click.Group()
        try:
            _call_one(pm, COMMANDS_HOOK, plugin, cli=staging)
            for command_name in staging.commands:
                if command_name in owners:
                    raise OptiflowError(f"command '{command_name}' is already provided by '{owners[command_name]}'")
        except Exception as exc:
            pm.reject(name, _failure_text(exc, COMMANDS_HOOK), plugin)
            continue
        commands.update(staging.commands)
        owners.update({command_name: name for command_name in staging.commands})
    pm.command_owners = {command: owners[command] for command in commands}
    return commands


@contextmanager
def registered_plugin(plugin: object, name: str | None = None) -> Iterator[PluginManager]:
    """Register ``plugin`` (a module, class or object with hook implementations) until the block ends.

    Meant for tests: the registry and plugin commands are rebuilt with it and
    again without it afterwards.  A plugin that is already registered (say,
    installed and found by its entry point) is left as it is.
    """
    pm = get_plugin_manager()
    if pm.is_registered(plugin):
        yield pm
        return
    registered = pm.register(plugin, name=name)
    assert registered is not None, "pluggy refused a plugin that is not registered"
    pm.distributions[registered] = REGISTERED_IN_CODE
    pm.invalidate()
    try:
        yield pm
    finally:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        pm.distributions.pop(registered, None)
        pm.invalidate()


def describe_plugins(pm: PluginManager | None = None, reserved: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Every plugin the manager knows: origin, status, hooks implemented and what it registered
    (``reserved``: the built-in command names, see :meth:`PluginManager.commands`)."""
    pm = pm or get_plugin_manager()
    registry, commands = pm.registry, pm.commands(reserved)
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        components: dict[str, list[str]] = {}
        namespaced: dict[str, list[str]] = {}
        for component in registry.select():
            if component.plugin == name:
                components.setdefault(component.kind, []).append(component.name)
                if component.namespaced_only:
                    namespaced.setdefault(component.kind, []).append(component.name)
        rows.append(_row(name, *pm.distribution(name), "loaded",
                         hooks=sorted(caller.name for caller in pm.get_hookcallers(plugin) or []),
                         components=components, namespaced_only=namespaced,
                         clashes=[line for owner, line in registry.clashes if owner == name],
                         commands=sorted(c for c in commands if pm.command_owners.get(c) == name)))
    rows += [_row(f.plugin, f.distribution, f.version, "failed", error=f.error) for f in pm.failures]
    rows += [_row(name, dist, version, "blocked") for name, dist, version in pm.blocked]
    return rows


_manager: PluginManager | None = None
_loading = threading.RLock()
_disabled_by_cli: frozenset[str] = frozenset()


def _add(pm: PluginManager, name: str, origin: tuple[str, str], load: Callable[[], object]) -> None:
    """Import and register one plugin; reject it if that fails or it implements an unknown hook."""
    if pm.has_plugin(name):
        pm.reject(name, "has the name of a plugin already loaded; rename its entry point", distribution=origin)
        return
    plugin = None
    try:
        plugin = load()
        pm.register(plugin, name=name)
        pm.distributions[name] = origin
        pm.check_pending()  # the plugins before this one passed: only this one can fail
    except pluggy.PluginValidationError as exc:
        unknown = re.search(r"unknown hook '([^']+)'", str(exc))
        reason = f"implements unknown hook '{unknown[1]}' (see docs/plugins.md for the hooks)" if unknown \
            else _failure_text(exc)
        pm.reject(name, f"failed to load: {reason}", plugin, distribution=origin)
    except Exception as exc:
        pm.reject(name, f"failed to load: {_failure_text(exc)}", plugin, distribution=origin)


def _entry_points() -> list[EntryPoint]:
    from importlib.metadata import entry_points

    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _call_one(pm: PluginManager, hook_name: str, plugin: object, **kwargs: object) -> None:
    """Call ``plugin``'s implementations of ``hook_name`` (if any) and no other plugin's, so a failure stays that
    plugin's; through pluggy, so the call is traced and its arguments matched as every hook call is."""
    if hook_name not in {caller.name for caller in pm.get_hookcallers(plugin) or []}:
        return
    others = [other for _, other in pm.list_name_plugin() if other is not None and other is not plugin]
    pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)


def _row(name: str, distribution: str, version: str, status: str, *, error: str | None = None,
         hooks: list[str] | None = None, components: dict[str, list[str]] | None = None,
         namespaced_only: dict[str, list[str]] | None = None, clashes: list[str] | None = None,
         commands: list[str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "distribution": distribution,
        "version": version,
        "builtin": distribution == BUILTIN_DISTRIBUTION,
        "status": status,
        "error": error,
        "hooks": hooks or [],
        "components": components or {},
        "namespaced_only": namespaced_only or {},
        "clashes": clashes or [],
        "commands": commands or [],
    }


def _failure_text(exc: BaseException, hook_name: str | None = None) -> str:
    """``duplicate optimizer 'x' ...`` for optiflow's own errors, ``Type: message`` (and the hook) for others."""
    if isinstance(exc, OptiflowError):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    return f"raised in {hook_name}: {text}" if hook_name else text


def _names(text: str) -> set[str]:
    return {plugin_key(n) for n in text.split(",") if n.strip()}


def adds_undeclared_metrics(pm: PluginManager) -> bool:
    """Whether a plugin from outside optiflow adds metrics (``optiflow_validation_end`` / ``optiflow_epoch_end``)
    and declares none (``optiflow_metric_names`` / ``optiflow_epoch_metric_names``): then a ``--metric`` no
    declared name matches may still be logged, and is checked on the finished runs."""
    builtin = tuple(module.rpartition(".")[0] + "." for module in DEFAULT_PLUGINS[:1]) + ("optiflow.",)

    def hooks(plugin: object) -> set[str]:
        return {caller.name for caller in pm.get_hookcallers(plugin) or []}

    for plugin in pm.get_plugins():
        module = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
        names = hooks(plugin)
        if (not str(module).startswith(builtin) and names & {"optiflow_validation_end", "optiflow_epoch_end"}
                and not names & {"optiflow_metric_names", "optiflow_epoch_metric_names"}):
            return True
    return False
