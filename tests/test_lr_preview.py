"""`optiflow lr-preview` draws a learning-rate schedule without training."""

from __future__ import annotations

import pytest

from optiflow.config import RunConfig
from optiflow.plugins import get_registry


@pytest.fixture
def warmup_scheduler():
    """A throw-away scheduler: linear warmup over 'warmup' steps, then constant."""

    def linear_warmup(optimizer, length, *, warmup: int = 10):
        """Linear warmup."""
        import torch

        from optiflow.schedule import Schedule

        return Schedule(torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, 1.0, total_iters=warmup), "step")

    registry = get_registry()
    registry.registrar("scheduler", "test-warmup")("test-warmup", linear_warmup)
    yield "test-warmup"
    registry.remove_plugin("test-warmup")


def test_preview_follows_a_warmup_schedule_step_by_step(warmup_scheduler):
    from optiflow.commands.lr_preview import preview

    config = RunConfig.from_dict({"sched": f"{warmup_scheduler}:warmup=20", "opt": "sgd", "lr": 0.5, "epochs": 3})
    result = preview(config, steps_per_epoch=10)
    assert len(result.rates) == 30
    assert result.rates[0] == pytest.approx(0.05)
    assert result.rates[20:] == pytest.approx([0.5] * 10)
    assert all(a < b for a, b in zip(result.rates[:20], result.rates[1:21]))
    assert result.warmup_end == pytest.approx(2.0)
    assert [row[0] for row in result.per_epoch()] == [1, 2, 3]


def test_lr_preview_counts_the_batches_and_saves_the_plot(invoke, tmp_path):
    out = tmp_path / "lr.png"
    result = invoke("lr-preview", "--opt", "sgd", "--lr", "0.1", "--sched", "step:step_size=3,gamma=0.5",
                    "--epochs", "7", "--batch-size", "100", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "7 epochs x 13 steps" in result.output  # 1293 training digits in batches of 100
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│")}
    assert "0.05" in lines["4"] and "0.025" in lines["7"]


def test_lr_preview_marks_warmup_of_an_epoch_stepped_schedule():
    from optiflow.commands.lr_preview import preview

    config = RunConfig.from_dict({"sched": "step:step_size=2,gamma=0.5", "opt": "sgd", "lr": 0.1, "epochs": 4})
    assert preview(config, steps_per_epoch=5).warmup_end is None
    rising = preview(RunConfig.from_dict({"sched": "cosine:warmup_epochs=2", "opt": "sgd", "lr": 0.1, "epochs": 6}),
                     steps_per_epoch=5)
    assert rising.warmup_end == pytest.approx(2.0)
    assert max(rising.rates) == pytest.approx(0.1)


def test_lr_preview_bad_input_is_one_line(invoke):
    result = invoke("lr-preview", "--sched", "stepp")
    assert result.exit_code == 2 and "unknown scheduler 'stepp'" in result.stderr
    assert result.stderr.count("\n") == 1


def test_lr_preview_takes_the_training_flags_themselves():
    """--opt, --sched, --data (and --lr, --epochs, --batch-size, --config) are the train command's flags,
    derived from the slot table: a new slot help or metavar reaches both."""
    from optiflow.cli import lr_preview, train
    from optiflow.slots import SLOT_BY_KEY

    shared = {"config_file", "opt", "sched", "data", "lr", "epochs", "batch_size"}
    previewed = {p.name: p for p in lr_preview.params}
    trained = {p.name: p for p in train.params}
    assert shared <= set(previewed)
    for name in shared:
        assert previewed[name].to_info_dict() == trained[name].to_info_dict(), name
    for key in ("opt", "sched", "data"):
        assert previewed[key].help == SLOT_BY_KEY[key].help
