"""One typed run configuration: defaults < YAML file < command-line flags."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import reprlib
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from optiflow.errors import OptiflowError
from optiflow.slots import SLOT_BY_KEY
from optiflow.values import coerce, key_name, type_name

#: the largest epoch count or batch size accepted (beyond it a typo, not a plan)
MAX_COUNT = 10**9
#: seeds are 32-bit, as numpy and scikit-learn take them
MAX_SEED = 2**32 - 1
#: bounds on what a config file may hold
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_NODES = 100_000
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,4})?)$")
AMP_MODES = ("off", "auto", "bf16", "fp16")


@dataclass(frozen=True)
class ComponentSpec:
    """A component name with its raw options, as in ``sgd:momentum=0.9,nesterov=true``."""

    name: str  #: the component's name (or ``plugin/name``)
    options: dict[str, Any] = field(default_factory=dict)  #: raw option values, typed when the run is planned

    @classmethod
    def parse(cls, value: object) -> ComponentSpec:
        """Parse ``name[:key=value,...]`` or a YAML mapping ``{name: ..., key: value}``."""
        if isinstance(value, ComponentSpec):
            return value
        if isinstance(value, dict):
            if "name" not in value:
                raise OptiflowError(f"component mapping {brief(value)} needs a 'name' key")
            return cls(str(value["name"]), {k: v for k, v in value.items() if k != "name"})
        if not isinstance(value, str) or not value.strip():
            raise OptiflowError(f"expected a component name such as 'adam' or 'sgd:momentum=0.9', got {brief(value)}")
        name, _, rest = unbracketed(value.strip()).partition(":")
        options: dict[str, Any] = {}
        for item in _split_top_level(rest):
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise OptiflowError(f"malformed option '{item}' in '{value}': write key=value")
            if key.strip() in options:
                raise OptiflowError(f"option '{key.strip()}' is given twice in '{value}'")
            options[key.strip()] = raw.strip()
        return cls(name.strip(), options)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={format_option(v)}" for k, v in self.options.items())


def unbracketed(text: str) -> str:
    """``text`` without one pair of brackets around all of it: ``[sgd:momentum=0.9,nesterov=true]`` is
    the component ``sgd:momentum=0.9,nesterov=true``, as an option's value (``sam:base=[...]``) writes it."""
    if text[:1] != "[" or text[-1:] != "]":
        return text
    depth = 0
    for index, char in enumerate(text):
        depth += char in "[("
        depth -= char in "])"
        if depth == 0:
            return text[1:-1].strip() if index == len(text) - 1 else text
    return text


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
        if depth < 0:
            raise OptiflowError(f"unbalanced brackets in '{text}': a ']' or ')' closes nothing")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise OptiflowError(f"unbalanced brackets in '{text}': a '[' or '(' is never closed")
    parts.append(current)
    return [p for p in (p.strip() for p in parts) if p]


def format_option(value: object) -> str:
    """An option's value as a spec writes it: a list, or a component with options (a mapping, or text holding a
    comma), in brackets, so that the text parses back to the same option: ``base=[sgd:momentum=0.9,nesterov=true]``."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(format_option, value)) + "]"
    if isinstance(value, dict):
        value = ComponentSpec.parse(value)
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"[{text}]" if "," in text and unbracketed(text) == text else text


@dataclass
class RunConfig:
    """Everything that determines a training run: one field per configuration key and ``optiflow train`` flag
    (docs/cli.md), the component slots as :class:`ComponentSpec`."""

    data: ComponentSpec = field(default_factory=lambda: _default_spec("data"))  #: the dataset (``--data``)
    norm: ComponentSpec = field(default_factory=lambda: _default_spec("norm"))  #: the input normalizer (``--norm``)
    aug: list[ComponentSpec] = field(default_factory=list)  #: training augmentations, in order (``--aug``)
    model: ComponentSpec = field(default_factory=lambda: _default_spec("model"))  #: the model (``--model``)
    loss: ComponentSpec | None = None  #: the loss; None: the task's default (``--loss``)
    opt: ComponentSpec = field(default_factory=lambda: _default_spec("opt"))  #: the optimizer (``--opt``)
    #: the learning-rate scheduler (``--sched``)
    sched: ComponentSpec = field(default_factory=lambda: _default_spec("sched"))
    init: ComponentSpec = field(default_factory=lambda: _default_spec("init"))  #: the weight initializer (``--init``)
    reg: list[ComponentSpec] = field(default_factory=list)  #: regularizers and per-run hook objects (``--reg``)
    epochs: int = 20  #: training epochs
    batch_size: int | str = 32  #: mini-batch size, or ``full`` (the whole training split)
    lr: float | None = None  #: learning rate for the optimizer (or the one a wrapper wraps); None: its default
    seed: int = 0  #: seed of the splits, initialization and batch order
    device: str = "auto"  #: ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``
    val_split: float = 0.1  #: share of the data held out for validation (0: none)
    test_split: float = 0.2  #: share held out for the test split (when the data has no official one)
    cv_folds: int = 0  #: K when this run is one fold of K-fold cross-validation (0: not a fold)
    cv_fold: int = 0  #: which fold this run is, 0 .. cv_folds - 1
    shuffle: bool = True  #: reshuffle the training batches every epoch
    drop_last: bool = False  #: drop the last, smaller batch of each epoch
    workers: int = 0  #: DataLoader worker processes
    pin_memory: bool = False  #: pin host memory for faster copies to the GPU
    log_step_loss: bool = False  #: also log the training loss of every step
    compile: bool = False  #: ``torch.compile`` the model
    channels_last: bool | None = None  #: channels-last memory format; None: on for conv nets on images on the CPU
    amp: str = "off"  #: mixed precision: ``off``, ``auto``, ``bf16`` or ``fp16``
    deterministic: bool = False  #: deterministic kernels, for bit-for-bit reproductions
    data_dir: str = "data"  #: where file-based datasets live
    experiment: str = "optiflow"  #: the MLflow experiment
    run_name: str | None = None  #: the MLflow run's name; None: ``<model>-<opt>-<sched>-<data>``
    #: the MLflow store; None: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns/mlflow.db``
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """A configuration from plain values (a YAML file's, ``to_dict``'s): unknown keys and bad values are
        one-line errors naming them; missing keys keep their defaults."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = key_name(raw_key)
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
        """Refuse values out of range (epochs < 1, splits outside [0, 1) ...) in one line."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise OptiflowError(message)

        need(isinstance(self.epochs, int) and 1 <= self.epochs <= MAX_COUNT,
             f"epochs must be an integer >= 1 and <= {MAX_COUNT}, got {brief(self.epochs)}")
        need(isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED,
             f"seed must be an integer in [0, {MAX_SEED}], got {brief(self.seed)}")
        need(
            self.batch_size == "full" or (isinstance(self.batch_size, int) and 1 <= self.batch_size <= MAX_COUNT),
            f"batch size must be an integer >= 1 or 'full', got {brief(self.batch_size)}",
        )
        need(self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
             f"learning rate must be > 0 and finite, got {brief(self.lr)}")
        need(0 <= self.val_split < 1, f"validation split must be in [0, 1), got {brief(self.val_split)}")
        need(0 < self.test_split < 1, f"test split must be in (0, 1), got {brief(self.test_split)}")
        need(self.val_split + self.test_split < 1, "validation and test splits leave no training data")
        need(self.cv_folds == 0 or self.cv_folds >= 2, f"cross-validation needs at least 2 folds, got {brief(self.cv_folds)}")
        need(self.cv_folds == 0 or 0 <= self.cv_fold < self.cv_folds,
             f"fold must be in [0, {self.cv_folds}), got {brief(self.cv_fold)}")
        need(isinstance(self.workers, int) and 0 <= self.workers <= 1024, f"workers must be in [0, 1024], got {brief(self.workers)}")
        need(self.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}, got {brief(self.amp)}")
        need(bool(DEVICE_PATTERN.match(str(self.device))), f"device must be auto, cpu, cuda or cuda:N, got {brief(self.device)}")

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
        """``to_dict`` as YAML: what a run logs as config.yaml and ``--config`` reads."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: object) -> RunConfig:
        """A copy with ``changes`` applied and validated."""
        return RunConfig.from_dict({**self.to_dict(), **changes})


def _convert(key: str, value: object) -> object:
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
    if key == "batch_size" and str(value).lower() == "full":
        return "full"
    value_type = _value_type(key)
    try:
        return coerce(value_type, value, ranged=False)  # validate() names each key's range
    except (TypeError, ValueError):
        raise OptiflowError(f"configuration key '{key}' expects {type_name(value_type)}, got {brief(value)}") from None


@functools.cache
def _value_type(key: str) -> type:
    """The type a configuration key's value is read as: the first of its field's types (``int | str`` is int)."""
    hint = typing.get_type_hints(RunConfig)[key]
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely (no code, no duplicate keys, bounded size and expansion), as
    one clear error when missing or malformed."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            raise OptiflowError(f"config file {path} is not a regular file (a device, pipe or socket cannot be read)")
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise OptiflowError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 1000} kB; is it a config file?")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise OptiflowError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise OptiflowError(f"config file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise OptiflowError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        values = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)  # MarkedYAMLError
        where = f" at line {mark.line + 1}" if mark else ""
        problem = f": {problem}" if problem else ""
        raise OptiflowError(f"config file {path} is not valid YAML{where}{problem}") from None
    except RecursionError:
        raise OptiflowError(f"config file {path} is nested too deeply") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise OptiflowError(f"config file {path} must hold a mapping of keys to values, not {type(values).__name__}")
    if _size(values) > MAX_CONFIG_NODES:
        raise OptiflowError(f"config file {path} expands to more than {MAX_CONFIG_NODES} values (YAML aliases?)")
    return values


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a name or a number, not a {type(key).__name__}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _size(value: object, budget: int = MAX_CONFIG_NODES + 1) -> int:
    """How many values ``value`` holds once aliases are expanded, counting no further than ``budget``."""
    count, stack = 0, [value]
    while stack and count < budget:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            stack += list(item)
    return count


def brief(value: object) -> str:
    """A value as an error message shows it: its repr, cut short."""
    return reprlib.repr(value)
