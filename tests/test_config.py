"""The run configuration (optiflow/config.py): component specs, typed keys, defaults < YAML file < flags."""

from __future__ import annotations

import pytest
import yaml

from optiflow.config import ComponentSpec, RunConfig
from optiflow.errors import OptiflowError


def test_amp_in_yaml_accepts_true_and_false():
    assert RunConfig.from_dict({"amp": True}).amp == "auto"
    assert RunConfig.from_dict({"amp": False}).amp == "off"


def test_print_config_shows_layers(invoke, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 7\nopt: sgd:momentum=0.5\nlr: 0.2\n")
    result = invoke("train", "--config", str(config), "--lr", "0.05", "--print-config", store=False)
    assert result.exit_code == 0
    assert "epochs: 7" in result.output and "lr: 0.05" in result.output and "sgd:momentum=0.5" in result.output
    printed = yaml.safe_load(result.output)
    assert (printed["epochs"], printed["lr"], printed["opt"]) == (7, 0.05, "sgd:momentum=0.5"), "file < flags"
    assert (printed["seed"], printed["model"]) == (0, "mlp"), "defaults fill what neither file nor flags set"


def test_component_spec_round_trips():
    spec = ComponentSpec.parse("mlp:hidden=[64,32],activation=tanh")
    assert spec.name == "mlp" and spec.options == {"hidden": "[64,32]", "activation": "tanh"}
    assert ComponentSpec.parse(str(spec)) == spec
    assert ComponentSpec.parse({"name": "sgd", "momentum": 0.9}) == ComponentSpec("sgd", {"momentum": 0.9})
    with pytest.raises(OptiflowError, match="malformed option 'momentum' in 'sgd:momentum'"):
        ComponentSpec.parse("sgd:momentum")


def test_to_dict_and_yaml_read_back_to_the_same_config():
    config = RunConfig.from_dict({
        "data": "csv:path=t.csv,target=y", "aug": ["hflip", "random-crop:padding=2"], "model": "mlp:hidden=[8,4]",
        "loss": "mse", "opt": "sgd:momentum=0.9", "reg": ["l2:strength=0.01"], "lr": 0.3,
        "batch_size": "full", "channels_last": "auto", "amp": True, "epochs": 4,
    })
    assert config.opt == ComponentSpec("sgd", {"momentum": "0.9"}) and config.channels_last is None
    assert [spec.name for spec in config.aug] == ["hflip", "random-crop"] and config.amp == "auto"
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig.from_dict(yaml.safe_load(config.to_yaml())) == config
    assert RunConfig.from_dict({"reg": "none", "loss": "auto"}) == RunConfig()
