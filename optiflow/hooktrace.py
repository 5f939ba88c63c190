"""Following hook calls: ``OPTIFLOW_TRACE_HOOKS`` printing, and naming the plugin behind an exception."""

from __future__ import annotations

import inspect
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterable
from typing import Any

import pluggy

from optiflow.values import env_flag

#: a run's ``--reg`` objects registered as plugins: ``{their plugin name: (the plugin that registered the
#: regularizer, "regularizer 'x'")}``
RunPlugins = dict[str, tuple[str, str]]


def culprit(pm: pluggy.PluginManager, exc: BaseException,
            parts: Iterable[tuple[str, str, str]] = ()) -> tuple[str, str] | None:
    """``(plugin name, hook name)`` of the hook implementation ``exc`` was raised from, if any; else
    ``(plugin, what)`` of the first of ``parts``, ``(plugin, what, module)`` (a plugin's optimizer and the
    module of its class), whose module holds the deepest frame among its own and optiflow's."""
    codes: dict[types.CodeType, tuple[str, str]] = {}
    for hook_name, caller in vars(pm.hook).items():
        for impl in caller.get_hookimpls():
            function = inspect.unwrap(getattr(impl.function, "__func__", impl.function))
            code = getattr(function, "__code__", None)
            if code is not None:
                codes.setdefault(code, (impl.plugin_name, hook_name))
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code in codes:
            return codes[frame.f_code]
    for plugin, what, module in parts:
        if _raised_in(exc, module):
            return plugin, what
    return None


def blame(names: RunPlugins, plugin: str, hook: str) -> str:
    """``plugin 'x' failed in optiflow_epoch_end``; a ``--reg`` object's hook names the plugin that registered it:
    ``plugin 'x' failed in regularizer 'y' (optiflow_test_end)``."""
    if plugin in names:
        registered_by, what = names[plugin]
        return f"plugin '{registered_by}' failed in {what} ({hook})"
    return f"plugin {plugin!r} failed in {hook}"


def owner(names: RunPlugins, plugin: str) -> str:
    """The name of the plugin behind ``plugin``: itself, or for a ``--reg`` object the plugin that registered it."""
    return names[plugin][0] if plugin in names else plugin


def _raised_in(exc: BaseException, module: str) -> bool:
    """Whether the deepest frame of ``exc``'s traceback that is ``module``'s or optiflow's own is ``module``'s: the
    optimizer's ``step`` raised, not the loss it called back into the core for."""
    deepest = False
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        name = str(frame.f_globals.get("__name__", ""))
        if name == module:
            deepest = True
        elif name.split(".")[0] == "optiflow":
            deepest = False
    return deepest


def hook_tracer() -> tuple[Callable[..., None], Callable[..., None]]:
    """pluggy monitoring callbacks printing ``hook(args) <- plugins  time`` for every hook call."""
    started: list[float] = []

    def before(hook_name: str, impls: list[pluggy.HookImpl], kwargs: dict[str, Any]) -> None:
        started.append(time.perf_counter())

    def after(outcome: pluggy.Result[object], hook_name: str, impls: list[pluggy.HookImpl], kwargs: dict[str, Any]) -> None:
        seconds = time.perf_counter() - started.pop()
        trace_line(hook_name, [impl.plugin_name for impl in impls], kwargs, seconds,
                    failed=outcome.exception is not None)

    return before, after


def trace_line(hook_name: str, plugins: list[str], kwargs: dict[str, Any], seconds: float,
                failed: bool = False) -> None:
    args = ", ".join(k if not isinstance(v, (int, float, str, bool)) else f"{k}={v!r}" for k, v in kwargs.items())
    status = "  RAISED" if failed else ""
    print(f"[optiflow trace] {hook_name}({args}) <- {', '.join(plugins) or '-'}  "
          f"{seconds * 1e3:.2f} ms{status}", file=sys.stderr, flush=True)


def tracing() -> bool:
    """Whether ``OPTIFLOW_TRACE_HOOKS`` asks for every hook call to be printed."""
    return env_flag("OPTIFLOW_TRACE_HOOKS")
