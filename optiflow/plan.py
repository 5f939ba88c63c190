"""The resolved plan of a run: every slot's component found and every option typed, before
anything is built.  Importing this module imports no torch, so commands can check a whole
grid or search space in a fraction of a second."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optiflow.config import ComponentSpec, RunConfig
from optiflow.errors import OptiflowError
from optiflow.registry import MAX_NESTING, Component, Nested, Registry, flat_options
from optiflow.slots import SLOTS

#: A component and its typed options, defaults filled: ``(Component, {option: value})``, as every slot of
#: :class:`Plan` holds it (``component, options = run.plan.opt``); an option that is a component holds a
#: :class:`~optiflow.registry.Nested`.
Resolved = tuple[Component, dict[str, Any]]

#: Run settings logged as parameters beside the components.
LOGGED_SETTINGS = ("epochs", "batch_size", "seed", "val_split", "test_split", "shuffle", "drop_last", "device",
                   "workers", "pin_memory", "compile", "amp", "deterministic")


@dataclass
class Plan:
    """Every slot of :data:`optiflow.slots.SLOTS` resolved: one field per slot key, each a ``(Component, typed
    options)`` pair (a list of them for ``aug`` and ``reg``; ``loss`` None for the task's default)."""

    config: RunConfig  #: the configuration the plan resolves
    data: Resolved  #: the dataset and its options: ``plan.data[1]["n"]``
    norm: Resolved  #: the input normalizer
    aug: list[Resolved]  #: the augmentations, in order
    model: Resolved  #: the model
    loss: Resolved | None  #: the loss; None: the task's default
    opt: Resolved  #: the optimizer: ``plan.opt[1]["lr"]``; a wrapped one is a :class:`~optiflow.registry.Nested`
    sched: Resolved  #: the learning-rate scheduler (``warmup_epochs`` among its options)
    init: Resolved  #: the weight initializer
    reg: list[Resolved]  #: the regularizers (and per-run hook objects), in order

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
            spec = with_lr(spec, config.lr, registry)
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


def with_lr(spec: ComponentSpec, lr: float, registry: Registry, depth: int = 0) -> ComponentSpec:
    """``--lr`` as the optimizer's ``lr`` option; a wrapper that declares none but wraps one optimizer (one option
    that is an optimizer spec, ``sam:base=[sgd]``) passes it on to the optimizer it wraps, which steps with it."""
    component = registry.get("optimizer", spec.name)
    wrapped = [o for o in component.options if o.component_kind == "optimizer"]
    if any(o.name == "lr" for o in component.options) or len(wrapped) != 1 or depth >= MAX_NESTING:
        return ComponentSpec(spec.name, {**spec.options, "lr": lr})  # no lr and no one base: the usual error
    base = wrapped[0]
    value = spec.options.get(base.name, base.default)
    inner = ComponentSpec(value.name, value.options) if isinstance(value, Nested) else ComponentSpec.parse(value)
    return ComponentSpec(spec.name, {**spec.options, base.name: with_lr(inner, lr, registry, depth + 1)})
