"""The resolved plan of a run: every slot's component found and every option typed, before
anything is built.  Importing this module imports no torch, so commands can check a whole
grid or search space in a fraction of a second."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optiflow.config import ComponentSpec, RunConfig
from optiflow.errors import OptiflowError
from optiflow.registry import Component, Registry, flat_options
from optiflow.slots import SLOTS

#: A component and its typed options.
Resolved = tuple[Component, dict[str, Any]]

#: Run settings logged as parameters beside the components.
LOGGED_SETTINGS = ("epochs", "batch_size", "seed", "val_split", "test_split", "shuffle", "drop_last", "device",
                   "workers", "pin_memory", "compile", "amp", "deterministic")


@dataclass
class Plan:
    """Every slot of :data:`optiflow.slots.SLOTS` resolved: one field per slot key, each a ``(Component, typed
    options)`` pair (a list of them for ``aug`` and ``reg``; ``loss`` None for the task's default)."""

    config: RunConfig
    data: Resolved
    norm: Resolved
    aug: list[Resolved]
    model: Resolved
    loss: Resolved | None
    opt: Resolved
    sched: Resolved
    init: Resolved
    reg: list[Resolved]

    def components(self) -> list[tuple[str, Resolved]]:
        """``(parameter key, resolved component)`` for every filled slot, in table order."""
        items: list[tuple[str, Resolved]] = []
        for slot in SLOTS:
            value = getattr(self, slot.key)
            if value is None:
                continue
            if not slot.repeatable:
                items.append((slot.key, value))
            elif slot.key == "reg":
                items += [(f"reg.{resolved[0].name}", resolved) for resolved in value]
            else:
                items += [(f"{slot.key}.{i}" if len(value) > 1 else slot.key, resolved)
                          for i, resolved in enumerate(value)]
        return items

    def params(self) -> dict[str, Any]:
        """Every resolved parameter, flattened as ``opt=adam``, ``opt.lr=0.001`` ..."""
        out: dict[str, Any] = {}
        for key, (component, options) in self.components():
            out[key] = component.name
            out.update(flat_options(key, options))
        out.update({key: getattr(self.config, key) for key in LOGGED_SETTINGS})
        if self.config.cv_folds:
            out.update(cv_folds=self.config.cv_folds, cv_fold=self.config.cv_fold)
        return out


def plan(config: RunConfig, registry: Registry) -> Plan:
    """Resolve the configuration against the registry; raises OptiflowError on any mistake."""

    def resolve(kind: str, spec: ComponentSpec) -> Resolved:
        component = registry.get(kind, spec.name)
        return component, component.resolve_options(spec.options)

    resolved: dict[str, Any] = {}
    for slot in SLOTS:
        spec = getattr(config, slot.key)
        if slot.key == "opt" and config.lr is not None:
            spec = ComponentSpec(spec.name, {**spec.options, "lr": config.lr})
        if slot.repeatable:
            resolved[slot.key] = [resolve(slot.kind, item) for item in spec]
        else:
            resolved[slot.key] = None if spec is None else resolve(slot.kind, spec)
    lr = resolved["opt"][1].get("lr")
    if lr is not None and lr <= 0:
        raise OptiflowError(f"learning rate must be > 0, got {lr}")
    names = [component.name for component, _ in resolved["reg"]]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise OptiflowError(f"regularizer '{duplicated[0]}' given twice; combine its options in one --reg")
    return Plan(config=config, **resolved)
