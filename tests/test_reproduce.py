"""`optiflow reproduce` re-runs a logged configuration and compares its metrics with the original's."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

from optiflow import hookimpl
from optiflow.cli import cli
from optiflow.config import RunConfig
from optiflow.errors import OptiflowError, RunInterrupted
from optiflow.plugins import get_plugin_manager

from helpers import runs_of

TINY = ("--epochs", "2", "--model", "mlp:hidden=[16]", "--batch-size", "64", "-q")


def test_reproduce_matches_the_original_run(invoke, mlflow_client, experiment):
    assert invoke("train", "--seed", "4", *TINY).exit_code == 0
    [original] = runs_of(mlflow_client, experiment)
    result = invoke("reproduce", original.info.run_id, "--tracking-uri", mlflow_client.tracking_uri, store=False)
    assert result.exit_code == 0, result.stderr
    assert "all metrics match" in result.output and "test_accuracy" in result.output
    _, again = runs_of(mlflow_client, experiment)
    assert again.data.tags["optiflow.reproduces"] == original.info.run_id
    assert again.data.params["seed"] == "4"
    assert again.data.metrics["test_loss"] == original.data.metrics["test_loss"]


def test_reproduce_exits_1_when_a_metric_differs(invoke, mlflow_client, experiment):
    assert invoke("train", *TINY).exit_code == 0
    [original] = runs_of(mlflow_client, experiment)
    mlflow_client.log_metric(original.info.run_id, "test_loss", 123.0, step=99)
    result = invoke("reproduce", original.info.run_id, "--tracking-uri", mlflow_client.tracking_uri, "-q",
                    store=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: 1 of ") and "test_loss" in result.stderr


def test_reproduce_rejects_unknown_and_parent_runs(invoke, mlflow_client, experiment, tmp_path):
    uri = mlflow_client.tracking_uri
    result = invoke("reproduce", "0123456789abcdef0123456789abcdef", "--tracking-uri", uri, store=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "no run '0123456789abcdef0123456789abcdef'" in result.stderr
    assert invoke("compare", "--vary", "lr=0.01", "--out", str(tmp_path), "--epochs", "1", "-q").exit_code == 0
    parent = next(r for r in runs_of(mlflow_client, experiment) if "mlflow.parentRunId" not in r.data.tags)
    result = invoke("reproduce", parent.info.run_id, "--tracking-uri", uri, store=False)
    assert result.exit_code == 2 and "compare parent run" in result.stderr


def foreign_run(mlflow_client, experiment, tmp_path, config: str) -> str:
    """A run whose config.yaml was written by someone else (a store the user did not make)."""
    run_id = mlflow_client.create_run(mlflow_client.create_experiment(experiment)).info.run_id
    (tmp_path / "config.yaml").write_text(config)
    mlflow_client.log_artifact(run_id, str(tmp_path / "config.yaml"))
    mlflow_client.set_terminated(run_id)
    return run_id


def test_a_stored_configuration_never_chooses_the_data_folder_nor_downloads(invoke, mlflow_client, experiment,
                                                                           tmp_path):
    run_id = foreign_run(mlflow_client, experiment, tmp_path,
                         f"data: mnist:download=true\ndata_dir: {tmp_path / 'theirs'}\ntracking_uri: sqlite:///x.db\n")
    result = invoke("reproduce", run_id, "--tracking-uri", mlflow_client.tracking_uri, "--data-dir", "mine",
                    store=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "MNIST files not found in mine/MNIST/raw; copy them there or allow the download" in result.stderr
    assert not (tmp_path / "theirs").exists() and not (tmp_path / "x.db").exists()
    assert len(runs_of(mlflow_client, experiment)) == 1


def test_a_stored_configuration_reads_only_under_the_data_folder(invoke, mlflow_client, experiment, tmp_path):
    run_id = foreign_run(mlflow_client, experiment, tmp_path, "data: csv:path=/etc/passwd,target=root\n")
    result = invoke("reproduce", run_id, "--tracking-uri", mlflow_client.tracking_uri, store=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"run {run_id} reads '/etc/passwd', outside --data-dir" in result.stderr
    assert len(runs_of(mlflow_client, experiment)) == 1


def test_placed_keeps_what_is_trained_and_takes_the_users_places():
    from optiflow.stored import placed

    values = {"data": "csv:path=t.csv,target=y", "data_dir": "/theirs", "tracking_uri": "sqlite:////theirs.db",
              "epochs": 3}
    assert placed(values, "r", tracking_uri="sqlite:///mine.db", data_dir=None, allow_download=False) == {
        "data": "csv:path=data/t.csv,target=y", "data_dir": "data", "tracking_uri": "sqlite:///mine.db", "epochs": 3}
    assert placed({"data": "cifar10"}, "r", tracking_uri="u", data_dir="d", allow_download=False)["data"] == \
        "cifar10:download=false"
    assert placed({"data": "cifar10:download=true"}, "r", tracking_uri="u", data_dir="d",
                  allow_download=True)["data"] == "cifar10:download=true"


def test_reproduce_refuses_a_negative_tolerance(invoke, mlflow_client):
    result = invoke("reproduce", "0123", "--rtol", "-1", "--tracking-uri", mlflow_client.tracking_uri, store=False)
    assert result.exit_code == 2 and result.stderr == "Error: --rtol must be >= 0 and finite, got -1.0\n"


@pytest.mark.parametrize("stored, expect", [
    ("- data: iris\n- epochs: 3\n", "its stored config file config.yaml must hold a mapping of keys to values, not list"),
    ("epochs: 2\nepochs: 3\n", "config.yaml"),
    ("just text", "must hold a mapping of keys to values, not str"),
], ids=["list", "duplicate-key", "scalar"])
@pytest.mark.parametrize("command", ["resume", "reproduce"])
def test_a_stored_configuration_that_is_not_a_mapping_is_one_line(invoke, mlflow_client, experiment, tmp_path,
                                                                   stored, expect, command):
    """The stored config.yaml gets the checks of a --config file, on --resume as on reproduce; the run is untouched."""
    run_id = foreign_run(mlflow_client, experiment, tmp_path, stored)
    mlflow_client.set_terminated(run_id, "KILLED")
    mlflow_client.set_tag(run_id, "failure", "interrupted by SIGINT")
    args = ["train", "--resume", run_id] if command == "resume" else ["reproduce", run_id]
    result = invoke(*args, "--tracking-uri", mlflow_client.tracking_uri, store=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"run '{run_id}': its stored config file config.yaml" in result.stderr and expect in result.stderr
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["failure"] == "interrupted by SIGINT"
    assert len(runs_of(mlflow_client, experiment)) == 1


def test_the_users_data_dir_grants_a_stored_path_outside_it(invoke, mlflow_client, experiment, tmp_path,
                                                            monkeypatch):
    """``../wine.csv`` (read from the working folder when trained) is granted by the user's own --data-dir holding
    it, never by the stored configuration; the refusal says which --data-dir would grant it."""
    from optiflow.stored import placed

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    values = {"data": "csv:path=../wine.csv,target=label"}
    with pytest.raises(OptiflowError, match=rf"outside --data-dir data: .* grant its folder: --data-dir {tmp_path}$"):
        placed(values, "r", tracking_uri="u", data_dir=None, allow_download=False)
    with pytest.raises(OptiflowError, match="outside --data-dir"):
        placed(values, "r", tracking_uri="u", data_dir=str(work), allow_download=False)
    granted = placed(values, "r", tracking_uri="u", data_dir=str(tmp_path), allow_download=False)
    assert granted["data"] == f"csv:path={tmp_path / 'wine.csv'},target=label"
    assert placed(values, "r", tracking_uri="u", data_dir="..", allow_download=False)["data"] == granted["data"]
    escape = {"data": "csv:path=../../etc/passwd,target=root"}
    with pytest.raises(OptiflowError, match="outside --data-dir"):
        placed(escape, "r", tracking_uri="u", data_dir="..", allow_download=False)


@pytest.mark.parametrize("where, data_dir, needed", [
    ("../wine.csv", None, "{tmp}"),
    ("wine.csv", None, "{tmp}/work"),
    ("data/wine.csv", None, "{tmp}/work/data"),
    ("only.csv", "data", None),
    ("wine.csv", "{tmp}", "{tmp}"),
], ids=["parent-folder", "working-folder", "under-data", "under-data-by-name", "own-data-dir"])
def test_the_data_dir_a_resume_needs_is_named(tmp_path, monkeypatch, where, data_dir, needed):
    from optiflow.stored import data_dir_needed, resume_command

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    for file in (tmp_path / "wine.csv", work / "wine.csv", work / "data" / "wine.csv", work / "data" / "only.csv"):
        file.write_text("a,label\n1,0\n")
    monkeypatch.chdir(work)
    values = {"data": f"csv:path={where},target=label"}
    if data_dir:
        values["data_dir"] = data_dir.format(tmp=tmp_path)
    config = RunConfig.from_dict(values)
    expected = needed.format(tmp=tmp_path) if needed else None
    assert data_dir_needed(config) == expected
    assert resume_command(config, "abc") == "optiflow train --resume abc" + (f" --data-dir {expected}" if expected else "")


class InterruptAt:
    """Ctrl-C at the end of epoch 2 (the checkpoint is epoch 1's)."""

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        if epoch == 2:
            raise RunInterrupted()


def test_the_printed_resume_command_works_for_data_outside_the_data_folder(invoke, mlflow_client, experiment,
                                                                          tmp_path, plugin, monkeypatch):
    """``--data csv:path=../wine.csv``: training warns which --data-dir its resume needs, the interrupted run prints a
    resume command naming it, and that very command finishes the run."""
    import shlex

    rows = "".join(f"{i % 7},{(i * 3) % 5},{i % 2}\n" for i in range(60))
    (tmp_path / "wine.csv").write_text("a,b,label\n" + rows)
    work = tmp_path / "work"
    work.mkdir()
    plugin(InterruptAt(), "interrupt-at-2")
    monkeypatch.chdir(work)
    store = ["--tracking-uri", mlflow_client.tracking_uri, "--experiment", experiment]
    result = CliRunner().invoke(cli, ["train", "--data", "csv:path=../wine.csv,target=label", "--epochs", "4", *store],
                                catch_exceptions=False)
    assert result.exit_code == 130, result.output
    warning, error = [line for line in result.stderr.splitlines() if line.strip()]
    assert warning.startswith("Warning: the data is read from outside the default data folder") and \
        warning.endswith(f"with --data-dir {tmp_path}")
    command = error.split("resume with: ", 1)[1].rstrip(")")
    assert command.endswith(f"--data-dir {tmp_path}")
    get_plugin_manager().unregister(name="interrupt-at-2")
    resumed = CliRunner().invoke(cli, [*shlex.split(command)[1:], "--tracking-uri", mlflow_client.tracking_uri, "-q"],
                                 catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == "FINISHED" and run.data.tags["optiflow.resumed_from_epoch"] == "1"
DETERMINISTIC = {
    "mlp": ("train", "--seed", "3", "--deterministic", *TINY),
    "cnn-augmented": ("train", "--deterministic", "--model", "cnn:channels=[4,8],hidden=[16,16]", "--aug", "hflip",
                      "--aug", "rotation", "--epochs", "2", "--batch-size", "64", "-q"),
    "compare-child": ("compare", "--deterministic", "--vary", "opt=sgd,adam", "--out", "cmp", *TINY),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_a_deterministic_run_reproduces_bit_for_bit(invoke, mlflow_client, experiment, kind):
    assert invoke(*DETERMINISTIC[kind]).exit_code == 0
    original = next(r for r in runs_of(mlflow_client, experiment) if "optiflow.kind" not in r.data.tags
                    and r.data.params.get("opt") == "adam")
    assert original.data.params["deterministic"] == "True" and original.data.params["cpu_threads"] == "1"
    result = invoke("reproduce", original.info.run_id, "--tracking-uri", mlflow_client.tracking_uri, store=False)
    assert result.exit_code == 0, result.stderr
    assert "weights identical bit for bit" in result.output
    again = next(r for r in runs_of(mlflow_client, experiment) if r.data.tags.get("optiflow.reproduces"))
    digest = original.data.tags["optiflow.weights_sha256"]
    assert len(digest) == 64 and again.data.tags["optiflow.weights_sha256"] == digest
    assert again.data.tags["optiflow.data_sha256"] == original.data.tags["optiflow.data_sha256"]
    assert again.data.metrics["test_loss"] == original.data.metrics["test_loss"]


class Nudge:
    """Moves one output bias by 1e-3 at the end of the last epoch: a re-run that is not the same training."""

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        if epoch == run.config.epochs:
            with torch.no_grad():
                list(run.model.parameters())[-1].view(-1)[0] += 1e-3


def test_weights_that_differ_are_reported_with_the_largest_difference(invoke, mlflow_client, experiment, plugin):
    assert invoke("train", "--deterministic", *TINY).exit_code == 0
    [original] = runs_of(mlflow_client, experiment)
    plugin(Nudge(), "nudge")
    result = invoke("reproduce", original.info.run_id, "--tracking-uri", mlflow_client.tracking_uri, "--rtol", "1",
                    store=False)
    assert result.exit_code == 1
    assert "weights differ, largest difference 0.001 in 3.bias, although both ran --deterministic" in \
        " ".join(result.output.split())
    assert result.stderr.startswith("Error: the final weights differ from run ")


def test_without_deterministic_a_weight_difference_is_reported_not_failed(invoke, mlflow_client, experiment, plugin):
    assert invoke("train", *TINY).exit_code == 0
    [original] = runs_of(mlflow_client, experiment)
    plugin(Nudge(), "nudge")
    result = invoke("reproduce", original.info.run_id, "--tracking-uri", mlflow_client.tracking_uri, "--rtol", "1",
                    "--atol", "1", store=False)
    assert result.exit_code == 0, result.stderr
    output = " ".join(result.output.split())
    assert "weights differ, largest difference 0.001 in 3.bias; bit-for-bit identity is promised only" in output
    assert re.search(r"all metrics match \(largest difference: test_\w+ by \d", output), output


def test_the_weights_hash_is_of_every_bit_of_every_tensor():
    from optiflow.digest import weights_digest

    model = torch.nn.Linear(3, 2)
    before = weights_digest(model)
    assert weights_digest(model) == before and len(before) == 64
    with torch.no_grad():
        model.bias.view(torch.int32)[0] ^= 1  # the lowest bit of one float
    assert weights_digest(model) != before
    state = {"w": torch.zeros(2, 3)}
    assert weights_digest(state) != weights_digest({"w": torch.zeros(3, 2)}) != weights_digest({"v": torch.zeros(2, 3)})
