"""The search space: ``--space NAME=SPEC`` parsed into dimensions, and the run configuration of one trial."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optiflow.config import ComponentSpec, RunConfig, load_yaml, split_variants
from optiflow.errors import OptiflowError
from optiflow.registry import Component
from optiflow.slots import SLOT_BY_KEY, SLOT_KINDS
from optiflow.values import key_name, literal

if TYPE_CHECKING:
    import optuna

#: a sampled value or a choice as Optuna stores it
Scalar = bool | int | float | str | None

NOT_SEARCHABLE = frozenset({"experiment", "tracking_uri", "run_name", "cv_folds", "cv_fold"})
RANGE_KINDS = {"loguniform": ("float", True), "uniform": ("float", False), "float": ("float", False),
               "int": ("int", False), "logint": ("int", True)}


@dataclass(frozen=True)
class Dimension:
    """One searched hyper-parameter: its name, what it sets and the range Optuna samples from.

    ``member`` names the component of a repeatable slot (``reg``, ``aug``) whose ``option`` it sets.
    """

    name: str
    key: str
    option: str | None = None
    member: str | None = None
    kind: str = "float"
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    step: float | None = None
    choices: tuple[Scalar, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Scalar:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def first(self) -> Scalar:
        """Its value at the space's first corner: the first choice, else the low bound."""
        return self.choices[0] if self.kind == "choice" else (int(self.low) if self.kind == "int" else self.low)

    def grid(self) -> list[Any]:
        """The values the grid sampler visits: choices, or a range with a step."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.kind == "float" and self.step and not self.log:
            count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
            return [round(self.low + i * self.step, 12) for i in range(count)]
        raise OptiflowError(f"the grid sampler needs finite values: give '{self.name}' a step "
                            f"(float:LOW:HIGH:STEP) or list them (choice:A,B,...)")


def parse_space(items: object, base: RunConfig) -> list[Dimension]:
    """``lr=loguniform:1e-4:1e-1``, ``opt=choice:sgd,adam``, ``hidden=int:32:256`` (or a YAML file of
    such entries, or a mapping) as dimensions resolved against the base configuration."""
    entries: dict[str, Any] = {}
    for item in items if isinstance(items, (list, tuple)) else [items]:
        if isinstance(item, dict):
            entries.update(item)
            continue
        name, sep, spec = str(item).partition("=")
        if not sep and Path(name).suffix in {".yaml", ".yml"}:
            entries.update(load_yaml(name))
        elif not sep or not name.strip() or not spec.strip():
            raise OptiflowError(f"--space expects NAME=SPEC (e.g. lr=loguniform:1e-4:1e-1) or a YAML file, got '{item}'")
        else:
            entries[name.strip()] = spec.strip()
    if not entries:
        raise OptiflowError("nothing to search: give at least one --space NAME=SPEC (e.g. lr=loguniform:1e-4:1e-1)")
    ranges = {str(name): _parse_range(str(name), spec) for name, spec in entries.items()}
    chosen = {key_name(name): dim.choices for name, dim in ranges.items() if dim.kind == "choice"}
    return [dataclasses.replace(dim, **_target(name, base, chosen)) for name, dim in ranges.items()]


def trial_config(base: RunConfig, space: list[Dimension], sample: Callable[[Dimension], Any]) -> tuple[RunConfig, dict[str, Any]]:
    """The configuration of one trial: settings first, then the options of the components chosen."""
    from optiflow.plugins import get_registry

    registry = get_registry()
    values = base.to_dict()
    sampled: dict[str, Any] = {}
    for dim in (d for d in space if d.option is None):
        sampled[dim.name] = values[dim.key] = sample(dim)
    for dim in (d for d in space if d.option is not None):
        repeatable = SLOT_BY_KEY[dim.key].repeatable
        if repeatable:
            specs = [ComponentSpec.parse(s) for s in values[dim.key]]
            index = next(i for i, spec in enumerate(specs) if spec.name == dim.member)
            spec = specs[index]
        else:
            spec = ComponentSpec.parse(values[dim.key])
        component = registry.get(SLOT_KINDS[dim.key], spec.name)
        if dim.option not in {o.name for o in component.options}:
            continue
        sampled[dim.name] = sample(dim)
        spec = ComponentSpec(spec.name, {**spec.options, dim.option: sampled[dim.name]})
        if repeatable:
            specs[index] = spec
            values[dim.key] = [str(s) for s in specs]
        else:
            values[dim.key] = str(spec)
    return RunConfig.from_dict(values), sampled


def describe_dimension(dim: Dimension) -> str:
    """The dimension as a ``--space`` spec (``loguniform:0.001:0.1``), for params and ``--print-config``."""
    if dim.kind == "choice":
        return "choice:" + "|".join(map(str, dim.choices))
    kind = {("float", True): "loguniform", ("float", False): "float", ("int", True): "logint", ("int", False): "int"}
    low, high = (int(dim.low), int(dim.high)) if dim.kind == "int" else (dim.low, dim.high)
    return f"{kind[(dim.kind, dim.log)]}:{low}:{high}" + (f":{dim.step:g}" if dim.step else "")


def short(value: object) -> str:
    """A sampled value as the progress lines and the trials table show it."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _parse_range(name: str, spec: object) -> Dimension:
    if isinstance(spec, list):
        return _choice(name, spec, spec)
    if isinstance(spec, dict):
        spec = dict(spec)
        kind = str(spec.pop("type", "choice" if "choices" in spec else "float"))
        if kind == "choice":
            return _choice(name, spec.get("choices"), spec)
        spec = ":".join([kind, str(spec.get("low")), str(spec.get("high"))]
                        + (["log"] if spec.get("log") else []) + ([str(spec["step"])] if spec.get("step") else []))
    kind, _, rest = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind == "choice":
        return _choice(name, split_variants(rest), spec)
    if kind not in RANGE_KINDS:
        raise OptiflowError(f"--space {name}: unknown range '{kind}'; use loguniform, uniform, float, int, "
                            f"logint or choice (e.g. {name}=loguniform:1e-4:1e-1)")
    number_kind, log = RANGE_KINDS[kind]
    parts = [p.strip() for p in rest.split(":") if p.strip()]
    if "log" in parts:
        parts.remove("log")
        log = True
    try:
        low, high = float(parts[0]), float(parts[1])
        step = float(parts[2]) if len(parts) > 2 else None
        if len(parts) > 3:
            raise ValueError
    except (IndexError, ValueError):
        raise OptiflowError(f"--space {name}: write {kind}:LOW:HIGH[:STEP], got '{spec}'") from None
    if number_kind == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise OptiflowError(f"--space {name}: int bounds must be whole numbers, got '{spec}'")
    if not low < high:
        raise OptiflowError(f"--space {name}: LOW must be below HIGH, got '{spec}'")
    if log and low <= 0:
        raise OptiflowError(f"--space {name}: a log range needs LOW > 0, got '{spec}'")
    if step is not None and (step <= 0 or log):
        raise OptiflowError(f"--space {name}: a step must be > 0 and cannot be combined with log, got '{spec}'")
    return Dimension(name, name, kind=number_kind, low=low, high=high, log=log, step=step)




def _choice(name: str, values: object, spec: object) -> Dimension:
    """A ``choice`` dimension of at least one value, none listed twice."""
    if not isinstance(values, (list, tuple)) or not values:
        raise OptiflowError(f"--space {name}: a choice needs at least one value, got {spec!r}")
    if any(isinstance(v, (list, dict)) for v in values):
        raise OptiflowError(f"--space {name}: a choice is a list of names or numbers, got {spec!r}")
    choices = tuple(literal(v) for v in values)
    if len(set(choices)) < len(choices):
        raise OptiflowError(f"--space {name}: a choice is listed twice in {spec!r}")
    return Dimension(name, name, kind="choice", choices=choices)


def _target(name: str, base: RunConfig, chosen: dict[str, tuple[Scalar, ...]]) -> dict[str, Any]:
    """What a space name sets: a configuration key (``lr``), a component option (``opt.momentum``,
    ``reg.l2.strength``) or an option name unique among the candidate components (``hidden``)."""
    from optiflow.plugins import get_registry

    registry = get_registry()
    key = key_name(name)
    fields = [f.name for f in dataclasses.fields(RunConfig) if f.name not in NOT_SEARCHABLE]
    if key in fields:
        return {"key": key}

    def candidates(slot: str) -> list[tuple[str | None, Component]]:
        if SLOT_BY_KEY[slot].repeatable:
            return [(spec.name, registry.get(SLOT_KINDS[slot], spec.name)) for spec in getattr(base, slot)]
        names = chosen.get(slot) or [getattr(base, slot) or None]
        specs = [ComponentSpec.parse(str(n)) for n in names if n is not None and str(n) != "None"]
        return [(None, registry.get(SLOT_KINDS[slot], spec.name)) for spec in specs]

    def offers(component: Component, option: str) -> bool:
        return option in {o.name for o in component.options}

    head, _, option = key.partition(".")
    if option:
        if head not in SLOT_KINDS:
            raise OptiflowError(f"--space {name}: '{head}' is not a component; use one of {', '.join(SLOT_KINDS)}")
        member = None
        if SLOT_BY_KEY[head].repeatable:
            member, _, option = name.partition(".")[2].partition(".")
            option = key_name(option)
            if member not in {spec.name for spec in getattr(base, head)}:
                raise OptiflowError(f"--space {name}: {SLOT_KINDS[head]} '{member}' is not in the run; "
                                    f"add --{head} {member}")
        found = [c for m, c in candidates(head) if (member is None or m == member) and offers(c, option)]
        if not found:
            raise OptiflowError(f"--space {name}: no {head} in this search has an option '{option}'")
        return {"key": head, "option": option, "member": member}
    owners = [(slot, m) for slot in SLOT_KINDS for m, c in candidates(slot) if offers(c, key)]
    if not owners:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise OptiflowError(f"--space {name}: not a setting or an option of the run's components{hint}")
    if len({slot for slot, _ in owners}) > 1:
        raise OptiflowError(f"--space {name}: ambiguous, write one of {', '.join(sorted({f'{s}.{key}' for s, _ in owners}))}")
    (owner, member), *_ = owners
    return {"key": owner, "option": key, "member": member}
