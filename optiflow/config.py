"""One typed run configuration: defaults < YAML file < command-line flags."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from optiflow.errors import OptiflowError
from optiflow.slots import SLOT_BY_KEY

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
AMP_MODES = ("off", "auto", "bf16", "fp16")


@dataclass(frozen=True)
class ComponentSpec:
    """A component name with its raw options, as in ``sgd:momentum=0.9,nesterov=true``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: str | dict | ComponentSpec) -> ComponentSpec:
        """Parse ``name[:key=value,...]`` or a YAML mapping ``{name: ..., key: value}``."""
        if isinstance(value, ComponentSpec):
            return value
        if isinstance(value, dict):
            if "name" not in value:
                raise OptiflowError(f"component mapping {value!r} needs a 'name' key")
            return cls(str(value["name"]), {k: v for k, v in value.items() if k != "name"})
        if not isinstance(value, str) or not value.strip():
            raise OptiflowError(f"expected a component name such as 'adam' or 'sgd:momentum=0.9', got {value!r}")
        name, _, rest = value.strip().partition(":")
        options: dict[str, Any] = {}
        for item in _split_top_level(rest):
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise OptiflowError(f"malformed option '{item}' in '{value}': write key=value")
            options[key.strip()] = raw.strip()
        return cls(name.strip(), options)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_format(v)}" for k, v in self.options.items())


def _default_spec(key: str) -> ComponentSpec:
    """The component a slot holds when the configuration does not name one."""
    return ComponentSpec(str(SLOT_BY_KEY[key].default))


def split_variants(text: str) -> list[str]:
    """Split a list of values, keeping each component's options with it.

    ``sgd:momentum=0.9,nesterov=true,adam`` gives ``["sgd:momentum=0.9,nesterov=true", "adam"]``:
    a ``key=value`` piece belongs to the component before it.  With ``|`` in the text,
    only ``|`` separates values (``sgd:momentum=0.9|adam``).
    """
    if "|" in text:
        values = [v.strip() for v in text.split("|")]
    else:
        values = []
        for piece in _split_top_level(text):
            if "=" in piece.split(":", 1)[0] and values and ":" in values[-1]:
                values[-1] += "," + piece
            elif "=" in piece.split(":", 1)[0]:
                raise OptiflowError(f"'{piece}' in '{text}' is an option without a component: write name:{piece}")
            else:
                values.append(piece)
    if not values or any(not v for v in values):
        raise OptiflowError(f"empty value in '{text}': separate values with ',' or '|'")
    return values


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets, so ``hidden=[64,32],act=relu`` works."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[("
        depth -= char in "])"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in (p.strip() for p in parts) if p]


def _format(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass
class RunConfig:
    """Everything that determines a training run."""

    data: ComponentSpec = field(default_factory=lambda: _default_spec("data"))
    norm: ComponentSpec = field(default_factory=lambda: _default_spec("norm"))
    aug: list[ComponentSpec] = field(default_factory=list)
    model: ComponentSpec = field(default_factory=lambda: _default_spec("model"))
    loss: ComponentSpec | None = None
    opt: ComponentSpec = field(default_factory=lambda: _default_spec("opt"))
    sched: ComponentSpec = field(default_factory=lambda: _default_spec("sched"))
    init: ComponentSpec = field(default_factory=lambda: _default_spec("init"))
    reg: list[ComponentSpec] = field(default_factory=list)
    epochs: int = 20
    batch_size: int | str = 32
    lr: float | None = None
    seed: int = 0
    device: str = "auto"
    val_split: float = 0.1
    test_split: float = 0.2
    cv_folds: int = 0
    cv_fold: int = 0
    shuffle: bool = True
    drop_last: bool = False
    workers: int = 0
    pin_memory: bool = False
    log_step_loss: bool = False
    compile: bool = False
    channels_last: bool | None = None  # None: auto (on for conv nets on images on the CPU)
    amp: str = "off"
    data_dir: str = "data"
    experiment: str = "optiflow"
    run_name: str | None = None
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise OptiflowError(f"unknown configuration key '{raw_key}'{hint}")
            if value is None:
                if "None" in known[key].type:
                    kwargs[key] = None
                continue
            kwargs[key] = _convert(key, value)
        return cls(**kwargs)

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise OptiflowError(message)

        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}")
        need(
            self.batch_size == "full" or (isinstance(self.batch_size, int) and self.batch_size >= 1),
            f"batch size must be an integer >= 1 or 'full', got {self.batch_size!r}",
        )
        need(self.lr is None or self.lr > 0, f"learning rate must be > 0, got {self.lr!r}")
        need(0 <= self.val_split < 1, f"validation split must be in [0, 1), got {self.val_split!r}")
        need(0 < self.test_split < 1, f"test split must be in (0, 1), got {self.test_split!r}")
        need(self.val_split + self.test_split < 1, "validation and test splits leave no training data")
        need(self.cv_folds == 0 or self.cv_folds >= 2, f"cross-validation needs at least 2 folds, got {self.cv_folds!r}")
        need(self.cv_folds == 0 or 0 <= self.cv_fold < self.cv_folds,
             f"fold must be in [0, {self.cv_folds}), got {self.cv_fold!r}")
        need(isinstance(self.workers, int) and self.workers >= 0, f"workers must be >= 0, got {self.workers!r}")
        need(self.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        need(bool(DEVICE_PATTERN.match(str(self.device))), f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (component specs as strings) that ``from_dict`` reads back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ComponentSpec):
                value = str(value)
            elif isinstance(value, list):
                value = [str(v) for v in value]
            out[f.name] = value
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> RunConfig:
        return RunConfig.from_dict({**self.to_dict(), **changes})


def _convert(key: str, value: Any) -> Any:
    field_type = {f.name: f.type for f in dataclasses.fields(RunConfig)}[key]
    slot = SLOT_BY_KEY.get(key)
    if slot is not None and slot.repeatable:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [ComponentSpec.parse(v) for v in items if v not in (None, "", "none")]
    if slot is not None:
        return None if value in (None, "", "auto") and slot.default is None else ComponentSpec.parse(value)
    if key == "amp" and isinstance(value, bool):
        return "auto" if value else "off"
    if key == "channels_last" and str(value).lower() == "auto":
        return None
    try:
        if key == "batch_size":
            return "full" if str(value).lower() == "full" else _strict(int, value)
        if field_type.startswith("int"):
            return _strict(int, value)
        if field_type.startswith("float"):
            return _strict(float, value)
        if field_type.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in {"true", "1", "yes", "on"}:
                return True
            if str(value).lower() in {"false", "0", "no", "off"}:
                return False
            raise ValueError(value)
        if field_type.startswith("str"):
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise OptiflowError(f"configuration key '{key}' expects {field_type.split(' ')[0]}, got {value!r}") from None
    return value


def _strict(tp: type, value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise TypeError(value)
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return tp(value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``safe_load``, as one clear error when missing or malformed."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise OptiflowError(f"config file not found: {path}") from None
    except OSError as exc:
        raise OptiflowError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise OptiflowError(f"config file {path} is not valid YAML{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise OptiflowError(f"config file {path} must hold a mapping of keys to values, not {type(values).__name__}")
    return values
