"""The figures runs and commands log: axes over epochs tick at whole epochs."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from optiflow.plots import learning_curves, lr_schedule, overlay_curves

HISTORY = {"train_loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.7, 0.5], "val_accuracy": [0.5, 0.7, 0.8]}


def epoch_axes(figure) -> list:
    return [axis for axis in figure.axes if axis.get_xlabel() == "epoch"]


@pytest.mark.parametrize("draw", [
    lambda: learning_curves(HISTORY, title="three epochs"),
    lambda: overlay_curves({"a": [HISTORY, HISTORY], "b": [HISTORY]}),
    lambda: lr_schedule([step / 4 for step in range(13)], [0.1 * (1 - step / 13) for step in range(13)], warmup_end=0.5),
], ids=["learning-curves", "overlay-curves", "lr-schedule"])
def test_epoch_axes_tick_at_whole_epochs(draw):
    figure = draw()
    try:
        figure.canvas.draw()
        axes = epoch_axes(figure)
        assert axes
        for axis in axes:
            low, high = axis.get_xlim()
            ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]
            assert len(ticks) >= 2 and all(float(tick).is_integer() for tick in ticks), ticks
            labels = [label.get_text() for label in axis.get_xticklabels() if label.get_text()]
            assert all(label.lstrip("−-").isdigit() for label in labels), labels
    finally:
        plt.close(figure)


def test_a_runs_title_names_every_component_that_is_not_the_default():
    from optiflow.config import RunConfig
    from optiflow.plugins import get_registry
    from optiflow.run import prepare
    from optiflow.training import components_title

    run = prepare(RunConfig.from_dict({"epochs": 1, "model": "mlp:hidden=[8]", "opt": "sgd:momentum=0.9",
                                       "sched": "cosine", "reg": ["l2:strength=0.01"], "device": "cpu"}),
                  get_registry())
    assert components_title(run) == "digits / mlp:hidden=[8] / sgd:momentum=0.9 / cosine / l2:strength=0.01  (lr 0.01)"


def test_the_interval_chart_says_what_it_shows():
    from optiflow.confidence import t_interval
    from optiflow.plots import metric_intervals

    values = [[0.9, 0.92, 0.91], [0.8, 0.85, 0.83]]
    figure = metric_intervals(["a", "b"], values, [t_interval(v) for v in values], "test_accuracy")
    axis = figure.axes[0]
    assert axis.get_title() == "final test_accuracy (mean and 95% t-interval over 3 seeds)"
    assert axis.get_ylim()[0] == 0.0, "bars start at zero"
    one = metric_intervals(["a", "b"], [[0.9], [0.8]], [None, None], "test_accuracy").axes[0]
    assert "no interval can be given" in one.get_title() and "±" not in one.get_title()


def test_gradient_flow_names_its_lines_by_legend_or_colour_scale():
    from optiflow_plugins.diagnostics import GradientFlow

    for epochs, expected in ((3, "legend"), (15, "colorbar")):
        flow = GradientFlow()
        for epoch in range(1, epochs + 1):
            flow.record(epoch, {"fc1": 1.0 / epoch, "fc2": 0.5 / epoch})
        figure = flow.figure()
        axis = figure.axes[0]
        if expected == "legend":
            assert [t.get_text() for t in axis.get_legend().get_texts()] == ["epoch 1", "epoch 2", "epoch 3"]
        else:
            assert len(figure.axes) == 2 and figure.axes[1].get_ylabel() == "epoch"
        plt.close(figure)


def test_search_plots_name_the_metric_and_how_few_trials_importance_rests_on():
    from types import SimpleNamespace

    import optuna

    from optiflow.search.summary import _log_plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True) + t.suggest_int("width", 1, 9), n_trials=6)
    drawn = {}

    class Tracker:
        def log_figure(self, figure, name):
            drawn[name] = figure.make().axes[0]  # a Recipe, drawn beside the search: drawn here to look at

        def set_tags(self, tags):
            raise AssertionError(tags)

    _log_plots(Tracker(), study, SimpleNamespace(metric="val_loss", pruner="none"), complete=6)
    assert drawn["optimization_history.png"].get_ylabel() == "val_loss"
    importance = drawn["param_importances.png"]
    assert importance.get_title() == "importance for val_loss, from 6 complete trials: few trials, a rough estimate"
    assert importance.get_title(loc="left") == importance.get_title(loc="right") == "", "no title drawn over ours"
    assert "Objective Value" not in importance.get_xlabel()
