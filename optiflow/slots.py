"""The one table of component families and run slots that the registry, the hooks, the CLI
flags, the plan and the search space all derive from.

A *family* is what one registration hook registers (``optiflow_register_data`` registers
datasets, normalizers and augmentations).  A *slot* is a place in a run that a component
fills, named as its configuration key and CLI flag (``--opt adam`` fills the ``opt`` slot
with the optimizer ``adam``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """The kinds of component one registration hook may register."""

    name: str
    hook: str
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class Slot:
    """A place in a run filled by a component of ``kind``; ``key`` is its config key and CLI flag."""

    key: str
    kind: str
    default: str | None
    help: str
    repeatable: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("data", "optiflow_register_data", ("dataset", "normalizer", "augmentation")),
    Family("model", "optiflow_register_models", ("model", "activation", "loss")),
    Family("optimizer", "optiflow_register_optimizers", ("optimizer",)),
    Family("regularizer", "optiflow_register_regularizers", ("regularizer",)),
    Family("scheduler", "optiflow_register_schedulers", ("scheduler",)),
    Family("initializer", "optiflow_register_initializers", ("initializer",)),
)

SLOTS: tuple[Slot, ...] = (
    Slot("data", "dataset", "digits", "Dataset [digits]; e.g. iris, csv:path=data.csv,target=label."),
    Slot("norm", "normalizer", "standard", "Input normalization fitted on the training split [standard]."),
    Slot("aug", "augmentation", None, "Training-time augmentation (repeatable).", repeatable=True),
    Slot("model", "model", "mlp", "Model [mlp]; e.g. mlp:hidden=[256,128],activation=tanh."),
    Slot("loss", "loss", None, "Loss [cross-entropy for classification, mse for regression]."),
    Slot("opt", "optimizer", "adam", "Optimizer [adam]; e.g. sgd:momentum=0.9,nesterov=true."),
    Slot("sched", "scheduler", "none", "Learning-rate schedule [none]; e.g. step:step_size=10,gamma=0.1."),
    Slot("init", "initializer", "default", "Weight initialization [default]; e.g. kaiming-normal."),
    Slot("reg", "regularizer", None, "Regularizer (repeatable); e.g. l2:strength=1e-4.", repeatable=True),
)

KINDS: tuple[str, ...] = tuple(kind for family in FAMILIES for kind in family.kinds)
FAMILY_KINDS: dict[str, tuple[str, ...]] = {family.name: family.kinds for family in FAMILIES}
SLOT_BY_KEY: dict[str, Slot] = {slot.key: slot for slot in SLOTS}
SLOT_KINDS: dict[str, str] = {slot.key: slot.kind for slot in SLOTS}


def family_of(kind: str) -> Family:
    """The family whose registration hook registers ``kind``."""
    return next(family for family in FAMILIES if kind in family.kinds)
