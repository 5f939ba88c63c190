"""`optiflow compare` end to end: a parent run, one child per variant and seed, plots and tables."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from optiflow.config import split_variants

from helpers import assert_no_run, runs_of

TINY = ("--epochs", "2", "--model", "mlp:hidden=[16]", "--batch-size", "64", "-q")


def children_of(client, experiment: str):
    runs = runs_of(client, experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_compare_logs_parent_children_plots_and_tables(invoke, mlflow_client, experiment, tmp_path):
    out = tmp_path / "out"
    result = invoke("compare", "--vary", "opt=sgd:momentum=0.9,nesterov=true,adam", "--repeats", "2",
                    "--out", str(out), *TINY)
    assert result.exit_code == 0, result.stderr
    [parent], children = children_of(mlflow_client, experiment)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["repeats"] == "2" and parent.data.params["variants"] == "2"
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    by_variant = {}
    for child in children:
        by_variant.setdefault(child.data.tags["optiflow.variant"], []).append(child)
    assert set(by_variant) == {"opt=sgd:momentum=0.9,nesterov=true", "opt=adam"}
    for runs in by_variant.values():
        assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    sgd = by_variant["opt=sgd:momentum=0.9,nesterov=true"][0].data.params
    assert sgd["opt"] == "sgd" and sgd["opt.momentum"] == "0.9" and sgd["opt.nesterov"] == "True"
    for child in children:
        assert [m.step for m in mlflow_client.get_metric_history(child.info.run_id, "val_loss")] == [1, 2]

    expected = {"loss_curves.png", "final_metric.png", "summary.csv", "summary.md", "runs.csv", "config.yaml"}
    assert expected <= {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}
    assert expected - {"config.yaml"} <= {p.name for p in out.iterdir()}
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["variant"] for r in rows] == ["opt=sgd:momentum=0.9,nesterov=true", "opt=adam"]
    accuracies = [c.data.metrics["test_accuracy"] for c in by_variant["opt=adam"]]
    assert float(rows[1]["test_accuracy mean"]) == pytest.approx(sum(accuracies) / 2, abs=1e-4)
    assert parent.data.tags["best_variant"] in by_variant
    assert "| opt=adam |" in (out / "summary.md").read_text()


def test_a_diverging_variant_fails_alone(invoke, mlflow_client, experiment, tmp_path):
    result = invoke("compare", "--opt", "sgd", "--vary", "lr=0.05,1e30", "--out", str(tmp_path / "o"), *TINY)
    assert result.exit_code == 0, result.stderr
    [parent], children = children_of(mlflow_client, experiment)
    assert parent.info.status == "FINISHED"
    statuses = {c.data.params["opt.lr"]: c.info.status for c in children}
    assert statuses == {"0.05": "FINISHED", "1e+30": "FAILED"}
    rows = {r["variant"]: r for r in csv.DictReader((tmp_path / "o" / "summary.csv").open())}
    assert rows["lr=1e30"]["failed"] == "1" and rows["lr=0.05"]["failed"] == "0"


def test_config_file_holds_the_grid_and_flags_override(invoke, tmp_path):
    config = tmp_path / "compare.yaml"
    config.write_text("epochs: 3\nvary:\n  opt: [sgd, adam]\n  lr: [0.1, 0.01]\nrepeats: 2\n")
    result = invoke("compare", "--config", str(config), "--vary", "lr=0.5", "--epochs", "4", "--print-config",
                    store=False)
    assert result.exit_code == 0, result.stderr
    printed = yaml.safe_load(result.output)
    assert printed["epochs"] == 4 and printed["repeats"] == 2
    assert printed["vary"] == {"opt": "sgd|adam", "lr": "0.5"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vary", "optimizer=sgd,adam"], "cannot vary 'optimizer' (did you mean 'opt'?)"),
        (["--vary", "opt"], "--vary expects KEY=VALUE,VALUE"),
        (["--vary", "opt=sgd,adamm"], "unknown optimizer 'adamm'"),
        (["--vary", "opt=momentum=0.9,adam"], "is an option without a component"),
        (["--vary", "lr=0.1", "--repeats", "0"], "--repeats must be in [1, 10000]"),
        ([], "nothing to compare"),
    ],
)
def test_bad_grid_is_one_line_and_creates_no_run(invoke, mlflow_client, experiment, args, message):
    result = invoke("compare", *args, "-q")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert_no_run(mlflow_client, experiment)


@pytest.mark.parametrize(
    "text, values",
    [
        ("sgd,momentum,adam", ["sgd", "momentum", "adam"]),
        ("sgd:momentum=0.9,nesterov=true,adam", ["sgd:momentum=0.9,nesterov=true", "adam"]),
        ("mlp:hidden=[64,32],mlp:hidden=[8]", ["mlp:hidden=[64,32]", "mlp:hidden=[8]"]),
        ("sgd:momentum=0.9|adam:eps=1e-6", ["sgd:momentum=0.9", "adam:eps=1e-6"]),
        ("0.1,0.01", ["0.1", "0.01"]),
    ],
)
def test_values_keep_their_component_options(text, values):
    assert split_variants(text) == values


@pytest.mark.slow
def test_register_registers_the_best_variants_model(invoke, mlflow_client, experiment, tmp_path):
    result = invoke("compare", "--opt", "sgd", "--vary", "lr=0.0001,0.1", "--repeats", "2", "--metric", "test_loss",
                    "--register", experiment, "--out", str(tmp_path / "o"), *TINY[:-1])
    assert result.exit_code == 0, result.stderr
    [parent], children = children_of(mlflow_client, experiment)
    assert parent.data.tags["best_variant"] == "lr=0.1"
    best = min((c for c in children if c.data.tags["optiflow.variant"] == "lr=0.1"),
               key=lambda c: c.data.metrics["test_loss"])
    version = mlflow_client.get_model_version(experiment, "1")
    assert version.run_id == best.info.run_id
    assert parent.data.tags["registered_model"] == f"models:/{experiment}/1"
    assert parent.data.tags["registered_run_id"] == best.info.run_id
    assert f"as '{experiment}' version 1" in result.output and best.info.run_id in result.output
    for child in children:  # every child logged its model, so any of them can be registered later
        assert mlflow_client.search_logged_models([child.info.experiment_id], f"source_run_id = '{child.info.run_id}'")


@pytest.mark.slow
def test_repeats_give_intervals_and_paired_tests_recomputable_from_the_children(invoke, mlflow_client, experiment,
                                                                               tmp_path):
    from scipy import stats

    out = tmp_path / "out"
    result = invoke("compare", "--vary", "opt=sgd,adam,rmsprop", "--repeats", "3", "--baseline", "adam",
                    "--out", str(out), *TINY[:-1])
    assert result.exit_code == 0, result.stderr
    assert "95% t-interval over seeds" in " ".join(result.output.split())
    [parent], children = children_of(mlflow_client, experiment)
    assert parent.data.tags["baseline_variant"] == "opt=adam"
    by_variant: dict[str, dict[str, float]] = {}
    for child in children:
        by_variant.setdefault(child.data.tags["optiflow.variant"], {})[child.data.params["seed"]] = \
            child.data.metrics["test_accuracy"]
    rows = {r["variant"]: r for r in csv.DictReader((out / "summary.csv").open())}
    metrics = parent.data.metrics
    for index, label in enumerate(["opt=sgd", "opt=adam", "opt=rmsprop"], 1):
        assert parent.data.tags[f"variant_{index}"] == label
        values = [by_variant[label][seed] for seed in ("0", "1", "2")]
        low, high = stats.t.interval(0.95, 2, loc=sum(values) / 3, scale=stats.sem(values))
        assert metrics[f"variant_{index}.test_accuracy_ci_low"] == pytest.approx(low, abs=1e-9)
        assert metrics[f"variant_{index}.test_accuracy_ci_high"] == pytest.approx(high, abs=1e-9)
        assert float(rows[label]["test_accuracy 95% CI low"]) == pytest.approx(low, abs=1e-4)
        if label == "opt=adam":
            assert rows[label]["difference to opt=adam"] == "baseline"
            assert f"variant_{index}.test_accuracy_p_value" not in metrics
            continue
        baseline = [by_variant["opt=adam"][seed] for seed in ("0", "1", "2")]
        differences = [a - b for a, b in zip(values, baseline)]
        p_value = stats.ttest_rel(values, baseline).pvalue if len(set(differences)) > 1 else float(differences[0] == 0)
        assert metrics[f"variant_{index}.test_accuracy_p_value"] == pytest.approx(p_value, abs=1e-9)
        assert metrics[f"variant_{index}.test_accuracy_difference"] == pytest.approx(sum(differences) / 3, abs=1e-12)
        assert rows[label]["significant at 5%"] == ("yes" if p_value < 0.05 else "no")
    assert "paired t-test" in (out / "summary.md").read_text()


def test_one_repeat_says_no_interval_can_be_given(invoke, mlflow_client, experiment, tmp_path):
    result = invoke("compare", "--vary", "opt=sgd,adam", "--out", str(tmp_path / "o"), *TINY[:-1])
    assert result.exit_code == 0, result.stderr
    assert "no confidence interval can be given from one seed per variant" in " ".join(result.output.split())
    [parent], _ = children_of(mlflow_client, experiment)
    assert not [k for k in parent.data.metrics if "_ci_" in k or "p_value" in k]
    rows = list(csv.DictReader((tmp_path / "o" / "summary.csv").open()))
    assert rows[1]["test_accuracy 95% CI low"] == "-" and rows[1]["p (paired t-test)"] == "-"


def test_an_unknown_baseline_is_refused_before_anything_runs(invoke, mlflow_client, experiment, tmp_path):
    result = invoke("compare", "--vary", "opt=sgd,adam", "--baseline", "adamw", "--out", str(tmp_path), *TINY)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "--baseline 'adamw' is not a variant (did you mean 'adam'?); choose from opt=sgd, opt=adam" in result.stderr
    assert_no_run(mlflow_client, experiment)


def test_paired_test_of_identical_and_constant_differences():
    from optiflow.confidence import paired_test, t_interval

    assert t_interval([0.5]) is None and paired_test({0: 1.0}, {0: 0.5}) is None
    assert paired_test({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6}).p_value == 1.0
    constant = paired_test({0: 0.6, 1: 0.7}, {0: 0.5, 1: 0.6})
    assert constant.significant and constant.difference == pytest.approx(0.1)
    assert paired_test({0: 0.6, 1: 0.7}, {2: 0.5, 3: 0.6}) is None, "no common seeds, nothing to pair"


def test_piped_tables_and_lines_never_wrap_a_name(capsys):
    from optiflow.console import console, result_table

    label = "opt=sgd:momentum=0.9,nesterov=true lr=0.001 sched=cosine:warmup_epochs=3,min_lr=0.0001"
    result_table("compare: final test_accuracy", ["variant", "runs", "mean [95% CI]"], [[label, "3", "0.9 [0.8, 1]"]])
    console.print(f"parent run {'f' * 32}  ·  files in /a/rather/long/folder/{'x' * 40}  ·  open the UI: mlflow ui")
    lines = capsys.readouterr().out.splitlines()
    assert any(label in line for line in lines), "the variant's name stays on one line"
    assert any("/a/rather/long/folder/" + "x" * 40 in line and "open the UI" in line for line in lines)


def test_folders_optiflow_creates_are_git_ignored_and_existing_ones_left_alone(invoke, tmp_path, monkeypatch):
    from optiflow.tracking import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    resolve_tracking_uri("sqlite:///mlruns/mlflow.db")
    assert (tmp_path / "mlruns" / ".gitignore").read_text().splitlines()[-1] == "*"
    assert invoke("compare", "--vary", "opt=sgd", "--out", "results/cmp", *TINY).exit_code == 0
    assert (tmp_path / "results" / ".gitignore").exists() and not (tmp_path / "results" / "cmp" / ".gitignore").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert invoke("compare", "--vary", "opt=sgd", "--out", str(mine), *TINY).exit_code == 0
    assert (mine / "summary.csv").exists() and not (mine / ".gitignore").exists()


@pytest.mark.parametrize("metric, args", [("train_seconds", ()), ("weight_norm", ("--reg", "weight-decay")),
                                          ("grad_norm/fc1", ()), ("penalty_l2", ("--reg", "l2"))])
def test_compare_ranks_by_every_metric_a_run_logs(invoke, mlflow_client, experiment, metric, args):
    """What runs log besides the epoch metrics (the training's wall time, built-in plugins' epoch-end metrics)
    is known before training, and the comparison ranks by it."""
    result = invoke("compare", "--vary", "opt=sgd,adam", "--metric", metric, "--epochs", "1", *args)
    assert result.exit_code == 0, result.output
    [parent] = [r for r in runs_of(mlflow_client, experiment) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.tags["best_variant"] in ("opt=sgd", "opt=adam")


def test_a_metric_of_an_undeclaring_third_party_plugin_is_checked_after_training(invoke, mlflow_client, experiment):
    """A plugin from outside optiflow adding an epoch metric without declaring it: its name is not refused up
    front (the comparison ranks by it); another unknown name still fails, after training, in one line."""
    from optiflow import hookimpl
    from optiflow.plugins import registered_plugin

    class Undeclared:
        @hookimpl
        def optiflow_epoch_end(self, run, epoch, metrics):
            metrics["my_metric"] = 1.0 / epoch

    with registered_plugin(Undeclared(), name="undeclared-metrics"):
        assert invoke("compare", "--vary", "opt=sgd,adam", "--metric", "my_metric", "--epochs", "1").exit_code == 0
        late = invoke("compare", "--vary", "opt=sgd,adam", "--metric", "nope", "--epochs", "1")
    assert late.exit_code != 0 and "no run produced metric 'nope'" in late.output


def test_the_summary_marks_the_best_variant_apart_from_significance_and_sums_seconds_over_seeds(invoke):
    """``*`` means a significant difference in the summary's note: the best variant is marked "yes", and the
    seconds column says it adds up every seed's run."""
    result = invoke("compare", "--vary", "opt=sgd,adam", "--epochs", "1", "--out", "o")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((Path.cwd() / "o" / "summary.csv").open()))
    assert sorted(row["best"] for row in rows) == ["", "yes"]
    assert all(float(row["seconds (all seeds)"]) > 0 for row in rows)


BRACKETED = "opt=[sam:base=[sgd:momentum=0.9,nesterov=true],rho=0.05]"


def test_printed_user_text_keeps_its_brackets(capsys, monkeypatch, tmp_path):
    """Specs, names and paths print as typed: rich markup never eats ``[sgd:...]`` (the console has markup off)."""
    from optiflow import console
    from optiflow.config import RunConfig
    from optiflow.registry import Component, Option
    from optiflow.run import RunResult
    from optiflow.search.summary import SearchResult

    config = RunConfig(experiment="exp [v2]", tracking_uri=f"sqlite:///{tmp_path}/[store].db")
    console.print_summary(RunResult("r1", {"test_[top1]": 0.5}, {}, 1, 0.1, config.tracking_uri), config)
    search = SearchResult("study [a]", "p1", 0.5, {"opt.base": "[sgd:momentum=0.9]"}, ["trial", "opt.base", "a", "b"],
                          [["0", "[sgd:momentum=0.5]", "", ""]], {"COMPLETE": 1})
    console.print_search(search, config)
    console.result_table("runs", ["variant"], [[BRACKETED]])
    monkeypatch.setattr(console.console, "_force_terminal", True)
    monkeypatch.setattr(console.console, "_width", 200)
    console.component_table([Component("optimizer", "wrap", lambda model: None, "[beta] wraps [sgd]",
                                       (Option("base", object, "[sgd:momentum=0.9]", component_kind="optimizer"),), plugin="mine")])
    bars = console._bars()
    bars.add_task(f"runs: {BRACKETED}", total=2, info="best opt.base=[adam]")
    console.console.print(bars.make_tasks_table(bars.tasks))
    output = capsys.readouterr().out
    assert f"runs: {BRACKETED}" in output and "best opt.base=[adam]" in output, "the live bars print names whole"
    for text in ("exp [v2]", "test_[top1]", "[store]", "study [a]", "best 0.5: opt.base=[sgd:momentum=0.9]",
                 "[sgd:momentum=0.5]", BRACKETED, "[beta] wraps [sgd]", "base=[sgd:momentum=0.9] (optimizer spec)"):
        assert text in output, text


def test_compare_prints_bracketed_variants_whole(invoke, tmp_path):
    result = invoke("compare", "--data", "iris", "--vary", "opt=[sgd:momentum=0.9,nesterov=true],[adam]",
                    "--epochs", "1", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.stderr
    assert "[1/2] opt=[sgd:momentum=0.9,nesterov=true]" in result.output
    assert result.output.count("opt=[sgd:momentum=0.9,nesterov=true]") >= 2, "announced and in the summary table"
