"""What ``optiflow list`` needs beyond the table: the kinds a name stands for, components as JSON records."""

from __future__ import annotations

from typing import Any

import click

from optiflow.slots import FAMILY_KINDS, KINDS


def kinds_named(name: str | None) -> tuple[str, ...]:
    """The kinds a family or kind name stands for (plurals too: ``losses``, ``optimizers``); every kind for None."""
    if name is None:
        return tuple(KINDS)
    named = {**FAMILY_KINDS, **{kind: (kind,) for kind in KINDS}}
    for candidate in (name, name[:-2] if name.endswith("es") else name, name[:-1] if name.endswith("s") else name):
        if candidate in named:
            return named[candidate]
    raise click.BadParameter(f"unknown kind '{name}'; choose from {', '.join(named)}")


def component_records(components: list[Any]) -> list[dict[str, Any]]:
    """One JSON-ready record per component: kind, name, aliases, typed options with defaults, description, plugin,
    and ``namespaced_only`` (it answers to ``plugin/name`` only)."""
    return [
        {"kind": c.kind, "name": c.name, "aliases": list(c.aliases),
         "options": [{"name": o.name, "type": o.type_name, "default": o.default,
                      "choices": list(o.choices) if o.choices else None} for o in c.options],
         "description": c.description, "plugin": c.plugin, "namespaced_only": c.namespaced_only}
        for c in components
    ]
