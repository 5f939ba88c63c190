"""The performance switches: batching paths, --workers/--pin-memory, --compile, --channels-last, --amp, DDP.

These check behaviour only; speed is measured by benchmarks/bench_train.py, never here.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import torch

from optiflow import hookimpl, host
from optiflow.config import RunConfig
from optiflow.data import LoaderBatches, TensorBatches
from optiflow.distributed import without_nproc
from optiflow.plugins import get_plugin_manager
from optiflow.runner import train

from conftest import run_cli, runs_of


def indices_seen(batches) -> list[int]:
    return [int(i) for xb, _ in batches for i in xb[:, 0]]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_tensor_batches_shard_one_permutation_across_ranks(world_size):
    x = torch.arange(10.0).unsqueeze(1)
    y = torch.arange(10)
    shards = [
        TensorBatches(x, y, 2, generator=torch.Generator().manual_seed(0), rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    seen = [indices_seen(shard) for shard in shards]
    assert len({len(shard) for shard in shards}) == 1, "every rank must run as many steps (DDP would hang)"
    assert sorted(set(sum(seen, []))) == list(range(10))
    assert sum(len(s) for s in seen) == -(-10 // world_size) * world_size  # padded to equal shards
    again = TensorBatches(x, y, 2, generator=torch.Generator().manual_seed(0), rank=0, world_size=world_size)
    assert indices_seen(again) == seen[0], "the same seed gives the same order"


def test_loader_batches_apply_the_transform_and_shard():
    x = torch.arange(12.0).reshape(12, 1, 1, 1)
    y = torch.arange(12)
    shards = [
        LoaderBatches(x, y, 4, device=torch.device("cpu"), transform=lambda s: s + 100, pin_memory=True,
                      generator=torch.Generator().manual_seed(1), rank=r, world_size=2)
        for r in range(2)
    ]
    values = sorted(int(v) for shard in shards for xb, _ in shard for v in xb.flatten())
    assert values == [v + 100 for v in range(12)]
    assert [len(shard) for shard in shards] == [2, 2]


def test_workers_and_pin_memory_stream_batches_through_a_dataloader(invoke, mlflow_client, experiment):
    result = invoke("train", "--epochs", "2", "--workers", "2", "--pin-memory", "-q")
    assert result.exit_code == 0, result.output
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == "FINISHED"
    assert run.data.params["workers"] == "2" and run.data.params["pin_memory"] == "True"
    assert run.data.metrics["val_accuracy"] > 0.8


class CountSteps:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.grads_present: list[bool] = []

    @hookimpl
    def optiflow_after_backward(self, run, step):
        self.steps.append(step)
        self.grads_present.append(all(p.grad is not None for p in run.model.parameters()))


def test_after_backward_runs_once_per_step_with_gradients(tracking_uri, experiment):
    counter = CountSteps()
    pm = get_plugin_manager()
    pm.register(counter, name="test-count-steps")
    try:
        config = RunConfig(epochs=2, batch_size=256, tracking_uri=tracking_uri, experiment=experiment)
        train(config, log_model=False)
    finally:
        pm.unregister(counter)
    batches_per_epoch = -(-1293 // 256)  # 1,797 digits less 20% test less 10% validation
    assert counter.steps == list(range(1, 2 * batches_per_epoch + 1))
    assert all(counter.grads_present)


def test_amp_bf16_on_cpu_trains(invoke, mlflow_client, experiment):
    result = invoke("train", "--epochs", "3", "--amp", "-q", "--device", "cpu")
    assert result.exit_code == 0, result.output
    [run] = runs_of(mlflow_client, experiment)
    assert run.data.params["amp"] == "auto"
    assert run.data.metrics["test_accuracy"] > 0.8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--amp", "fp16", "--device", "cpu"], "--amp fp16 is not supported on cpu"),
        (["--channels-last"], "--channels-last is for conv nets on images"),
        (["--amp", "half"], "'half' is not one of"),
        (["--nproc", "0"], "0 is not in the range"),
    ],
)
def test_bad_performance_options_are_one_line_and_leave_no_run(invoke, mlflow_client, experiment, args, message):
    result = invoke("train", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert mlflow_client.get_experiment_by_name(experiment) is None or not runs_of(mlflow_client, experiment)


def test_amp_in_yaml_accepts_true_and_false():
    assert RunConfig.from_dict({"amp": True}).amp == "auto"
    assert RunConfig.from_dict({"amp": False}).amp == "off"


@pytest.mark.slow
def test_compile_channels_last_and_amp_together(invoke, mlflow_client, experiment):
    result = invoke("train", "--data", "digits:image=true", "--model", "mlp:hidden=[32]", "--epochs", "2",
                    "--batch-size", "full", "--compile", "--channels-last", "--amp", "bf16", "-q")
    assert result.exit_code == 0, result.output
    [run] = runs_of(mlflow_client, experiment)
    params = run.data.params
    assert (params["compile"], params["channels_last"], params["amp"]) == ("True", "True", "bf16")
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    history = mlflow_client.get_metric_history(run.info.run_id, "train_loss")
    assert history[1].value < history[0].value


@pytest.mark.parametrize("args, expected", [
    (["--data", "digits:image=true", "--model", "cnn"], True),
    (["--data", "digits:image=true", "--model", "cnn", "--no-channels-last"], False),
    (["--data", "digits", "--model", "mlp"], False),
])
def test_channels_last_defaults_to_nhwc_for_conv_nets_on_cpu_images(invoke, mlflow_client, experiment, args, expected):
    from optiflow.plugins import get_plugin_manager, get_registry
    from optiflow.runner import prepare

    result = invoke("train", *args, "--epochs", "1", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    [run] = runs_of(mlflow_client, experiment)
    assert run.data.params["channels_last"] == str(expected)
    import mlflow.pytorch

    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert all(p.is_contiguous() for p in logged.parameters()), "the logged model has the standard layout"
    config = RunConfig.from_dict({"data": args[1], "model": args[3], "device": "cpu",
                                  "channels_last": False if "--no-channels-last" in args else "auto"})
    prepared = prepare(config, get_registry(), get_plugin_manager())
    convs = [m for m in prepared.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert prepared.channels_last is expected
    if convs:  # the last conv has many input channels, so the two layouts differ
        assert convs[-1].weight.is_contiguous(memory_format=torch.channels_last) is expected
        assert convs[-1].weight.is_contiguous() is not expected


def test_nproc_is_removed_from_the_relaunched_command():
    assert without_nproc(["train", "--nproc", "2", "--epochs", "3", "--nproc=4"]) == ["train", "--epochs", "3"]


@pytest.mark.slow
def test_two_gloo_processes_log_one_run_shaped_like_a_single_process_run(invoke, tracking_uri, experiment, tmp_path,
                                                                        mlflow_client):
    """DDP over 2 CPU processes: one MLflow run (rank 0), same epochs and metrics as one process."""
    common = ["train", "--epochs", "2", "--batch-size", "64", "-q"]
    assert invoke(*common).exit_code == 0
    ddp = run_cli(*common, "--nproc", "2", "--tracking-uri", tracking_uri, "--experiment", f"{experiment}-ddp",
                  cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr
    [one] = runs_of(mlflow_client, experiment)
    [two] = runs_of(mlflow_client, f"{experiment}-ddp")
    assert two.info.status == "FINISHED"
    assert set(two.data.metrics) == set(one.data.metrics)
    for key in ("train_loss", "val_loss", "val_accuracy", "samples_per_sec"):
        assert len(mlflow_client.get_metric_history(two.info.run_id, key)) == 2, key
    # metrics are reduced over both ranks: each epoch counts every training sample once (padding aside)
    history = {m.step: m.value for m in mlflow_client.get_metric_history(two.info.run_id, "samples_per_sec")}
    times = {m.step: m.value for m in mlflow_client.get_metric_history(two.info.run_id, "epoch_time")}
    assert history[2] * times[2] == pytest.approx(1294, abs=2)
    assert two.data.metrics["test_accuracy"] > 0.8


def test_adam_and_sgd_switch_to_fused_kernels_in_place_keeping_their_groups():
    from optiflow.optim import decay_params
    from optiflow.runner import use_fused_kernels

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    adam = torch.optim.Adam(decay_params(model, False), lr=0.01, betas=(0.8, 0.9), weight_decay=0.1)
    before = [(g["lr"], g["betas"], g["weight_decay"], len(g["params"])) for g in adam.param_groups]
    use_fused_kernels(adam)
    assert all(g["fused"] for g in adam.param_groups)
    assert [(g["lr"], g["betas"], g["weight_decay"], len(g["params"])) for g in adam.param_groups] == before
    model(torch.randn(5, 4)).sum().backward()
    adam.step()
    lbfgs = torch.optim.LBFGS(model.parameters())
    explicit = torch.optim.SGD(model.parameters(), lr=0.1, foreach=False)
    use_fused_kernels(lbfgs)
    use_fused_kernels(explicit)
    assert "fused" not in lbfgs.defaults and not explicit.param_groups[0]["fused"]


FAULTS_AFTER_TRAINING = """
import resource, sys, torch
from optiflow.config import RunConfig
from optiflow.runner import train

train(RunConfig.from_dict({"data": "iris", "epochs": 1, "device": "cpu", "tracking_uri": sys.argv[1]}),
      log_model=False)
block = 40 << 20  # above glibc's largest automatic mmap threshold (32 MiB), within one arena heap (64 MiB)
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(block, dtype=torch.uint8).fill_(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))  # the first rounds may still fault while the heap settles
"""


@pytest.mark.skipif(not host._glibc(), reason="malloc tuning is for glibc")
@pytest.mark.parametrize("switch, reused", [(None, True), ("0", False)])
def test_cpu_training_keeps_freed_blocks_for_reuse_unless_switched_off(tracking_uri, switch, reused):
    env = {**os.environ}
    env.pop(host.ENV_SWITCH, None)
    if switch is not None:
        env[host.ENV_SWITCH] = switch
    done = subprocess.run([sys.executable, "-c", FAULTS_AFTER_TRAINING, tracking_uri], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    faults = int(done.stdout.split()[-1])
    pages = 10 * (40 << 20) // resource.getpagesize()
    # reused: the 40 MiB block stays in the heap, no page is mapped in again;
    # handed back: every page of every block faults in anew
    assert faults < pages // 100 if reused else faults > pages // 2
