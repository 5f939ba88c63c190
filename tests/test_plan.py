"""The resolved plan (optiflow/plan.py): every slot's component found and its options typed, before anything is built."""

from __future__ import annotations

import pytest

from optiflow.config import RunConfig
from optiflow.errors import OptiflowError
from optiflow.plan import LOGGED_SETTINGS, plan
from optiflow.plugins import get_registry
from optiflow.slots import SLOTS


def planned(**values):
    return plan(RunConfig.from_dict(values), get_registry())


def test_plan_resolves_every_slot_in_table_order_and_flattens_its_options():
    resolved = planned(data="iris", norm="minmax", aug=["hflip"], model="mlp:hidden=[8,4],activation=tanh",
                       loss="mse", opt="sgd:momentum=0.9", sched="step:step_size=2", init="kaiming-normal",
                       reg=["l2:strength=0.01", "grad-clip"])
    for slot in SLOTS:
        value = getattr(resolved, slot.key)
        for component, _ in value if slot.repeatable else [value]:
            assert component.kind == slot.kind, slot.key
    assert [key for key, _ in resolved.components()] == [
        "data", "norm", "aug", "model", "loss", "opt", "sched", "init", "reg.l2", "reg.grad-clip"]

    params = resolved.params()
    assert params["opt"] == "sgd" and params["opt.momentum"] == 0.9 and params["opt.lr"] == 0.01
    assert params["model.hidden"] == (8, 4) and params["model.activation"] == "tanh"
    assert params["sched.step_size"] == 2 and params["reg.l2.strength"] == 0.01 and params["aug"] == "hflip"
    assert {key for key in params if "." not in key} == {
        "data", "norm", "aug", "model", "loss", "opt", "sched", "init", *LOGGED_SETTINGS}


def test_unset_loss_is_left_out_and_repeated_augmentations_are_numbered():
    resolved = planned(aug=["hflip", "vflip"])
    keys = [key for key, _ in resolved.components()]
    assert resolved.loss is None and "loss" not in keys
    assert keys[:4] == ["data", "norm", "aug.0", "aug.1"] and resolved.params()["aug.1"] == "vflip"
    assert "cv_folds" not in resolved.params()
    assert planned(cv_folds=3, cv_fold=1).params()["cv_fold"] == 1


def test_lr_flag_overrides_the_optimizers_own_lr():
    assert planned(opt="sgd:lr=0.3").opt[1]["lr"] == 0.3
    assert planned(opt="sgd:lr=0.3", lr=0.05).opt[1]["lr"] == 0.05
    assert planned(opt="adam", lr=0.02).params()["opt.lr"] == 0.02
    with pytest.raises(OptiflowError, match="learning rate must be > 0, got -1.0"):
        planned(opt="sgd:lr=-1")


def test_the_same_regularizer_twice_is_refused():
    with pytest.raises(OptiflowError, match="regularizer 'l2' given twice; combine its options in one --reg"):
        planned(reg=["l2", "dropout", "l2:strength=0.1"])


@pytest.mark.parametrize("slot", SLOTS, ids=[slot.key for slot in SLOTS])
def test_an_unknown_name_in_any_slot_names_the_valid_choices(slot):
    bogus = ["no-such-thing"] if slot.repeatable else "no-such-thing"
    with pytest.raises(OptiflowError) as info:
        planned(**{slot.key: bogus})
    message = str(info.value)
    assert message.startswith(f"unknown {slot.kind} 'no-such-thing'.")
    assert "Available: " + ", ".join(get_registry().names(slot.kind)) in message


def test_a_badly_typed_option_names_the_component():
    with pytest.raises(OptiflowError, match="^scheduler 'step': option 'step_size' expects int, got 'two'$"):
        planned(sched="step:step_size=two")
