"""Where and how a run computes (optiflow/setup.py): device, --amp, --channels-last, --compile, fused
optimizer kernels, batches streamed through a DataLoader (--workers/--pin-memory), glibc malloc tuning.

These check behaviour only; speed is measured by benchmarks/bench_train.py, never here.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import torch

from optiflow import distributed, hookimpl, host
from optiflow.config import RunConfig
from optiflow.data import LoaderBatches, TensorBatches
from optiflow.loop import training_batches
from optiflow.plugins import get_registry
from optiflow.run import prepare

from helpers import assert_no_run, runs_of


def test_workers_and_pin_memory_stream_batches_through_a_dataloader(invoke, mlflow_client, experiment):
    result = invoke("train", "--epochs", "2", "--workers", "2", "--pin-memory", "-q")
    assert result.exit_code == 0, result.output
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == "FINISHED"
    assert run.data.params["workers"] == "2" and run.data.params["pin_memory"] == "True"
    assert run.data.metrics["val_accuracy"] > 0.8
    streamed = prepare(RunConfig.from_dict({"workers": 2, "pin_memory": True, "device": "cpu"}), get_registry())
    batches = training_batches(streamed, distributed.current())
    assert streamed.setup.streamed and isinstance(batches, LoaderBatches) and batches.loader.num_workers == 2
    in_memory = prepare(RunConfig.from_dict({"device": "cpu"}), get_registry())
    assert not in_memory.setup.streamed
    assert isinstance(training_batches(in_memory, distributed.current()), TensorBatches)


class OutputDtypes:
    """Records the dtype of the model's outputs at every training step."""

    def __init__(self) -> None:
        self.seen: set[torch.dtype] = set()

    @hookimpl
    def optiflow_after_step(self, run, step):
        self.seen.add(run.last_outputs.dtype)


def test_amp_bf16_on_cpu_trains(invoke, mlflow_client, experiment, plugin):
    dtypes = OutputDtypes()
    plugin(dtypes, "test-output-dtypes")
    result = invoke("train", "--epochs", "3", "--amp", "-q", "--device", "cpu")
    assert result.exit_code == 0, result.output
    [run] = runs_of(mlflow_client, experiment)
    assert run.data.params["amp"] == "auto"
    assert dtypes.seen == {torch.bfloat16}, "every step ran its forward pass under bf16 autocast"
    assert run.data.metrics["test_accuracy"] > 0.8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--amp", "fp16", "--device", "cpu"], "--amp fp16 is not supported on cpu"),
        (["--data", "digits:image=false", "--channels-last"], "--channels-last is for conv nets on images"),
        (["--amp", "half"], "'half' is not one of"),
        (["--nproc", "0"], "0 is not in the range"),
    ],
)
def test_bad_performance_options_are_one_line_and_leave_no_run(invoke, mlflow_client, experiment, args, message):
    result = invoke("train", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert_no_run(mlflow_client, experiment)


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
    result = invoke("train", *args, "--epochs", "1", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    [run] = runs_of(mlflow_client, experiment)
    assert run.data.params["channels_last"] == str(expected)
    import mlflow.pytorch

    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert all(p.is_contiguous() for p in logged.parameters()), "the logged model has the standard layout"
    config = RunConfig.from_dict({"data": args[1], "model": args[3], "device": "cpu",
                                  "channels_last": False if "--no-channels-last" in args else "auto"})
    prepared = prepare(config, get_registry())
    convs = [m for m in prepared.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert prepared.setup.channels_last is expected
    assert bool(convs) == (args[3] == "cnn"), "the layout check below must run for the conv net"
    if convs:  # the last conv has many input channels, so the two layouts differ
        assert convs[-1].weight.is_contiguous(memory_format=torch.channels_last) is expected
        assert convs[-1].weight.is_contiguous() is not expected


def test_adam_and_sgd_switch_to_fused_kernels_in_place_keeping_their_groups():
    from optiflow.optim import decay_params
    from optiflow.setup import use_fused_kernels

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
from optiflow.commands.train import train

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


def test_cuda_auto_falls_back_to_cpu_and_cuda_without_gpu_is_an_error(invoke, mlflow_client, experiment):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("train", "--device", "cuda", "--epochs", "1", "-q")
    assert result.exit_code == 2 and "no CUDA device is available" in result.stderr
    assert invoke("train", "--device", "auto", "--epochs", "1", "-q").exit_code == 0
    [run] = runs_of(mlflow_client, experiment)
    assert run.data.params["device_type"] == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda(invoke, mlflow_client, experiment):
    assert invoke("train", "--device", "cuda", "--epochs", "2", "-q").exit_code == 0
    [run] = runs_of(mlflow_client, experiment)
    assert run.data.params["device_type"] == "cuda"


def test_one_parameter_group_without_weight_decay_with_identical_training():
    from optiflow.optim import decay_params
    from optiflow.plugins import get_registry

    def trained(groups_of) -> tuple[int, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
        optimizer = torch.optim.Adam(groups_of(model), lr=0.01)
        x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        return len(optimizer.param_groups), [p.detach().clone() for p in model.parameters()]

    groups, weights = trained(lambda m: decay_params(m, False, weight_decay=0.0))
    two, reference = trained(lambda m: decay_params(m, False))
    assert (groups, two) == (1, 2)
    assert all(torch.equal(a, b) for a, b in zip(weights, reference))
    model = torch.nn.Linear(3, 2)
    for name in ("adam", "sgd", "rmsprop", "adamw"):
        component = get_registry().get("optimizer", name)
        options = component.resolve_options({})
        decayed = component.factory(model, **{**options, "weight_decay": 0.1})
        plain = component.factory(model, **{**options, "weight_decay": 0.0})
        assert (len(decayed.param_groups), len(plain.param_groups)) == (2, 1), name


def test_small_cpu_models_train_on_one_thread_and_the_process_keeps_its_own(tmp_path, monkeypatch):
    from optiflow.commands.train import train
    from optiflow.config import RunConfig
    from optiflow.setup import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    small, big = torch.nn.Linear(64, 10), torch.nn.Linear(4096, 4096)
    config = RunConfig.from_dict({"batch_size": 64})
    x = torch.zeros(100, 64)
    assert cpu_threads(config, torch.device("cpu"), small, x) == 1
    assert cpu_threads(config, torch.device("cpu"), big, x) is None
    assert cpu_threads(config, torch.device("meta"), small, x) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(config, torch.device("cpu"), small, x) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    seen = []
    before = torch.get_num_threads()
    result = train(RunConfig.from_dict({"epochs": 1, "model": "mlp:hidden=[8]", "device": "cpu",
                                        "tracking_uri": f"sqlite:///{tmp_path}/m.db", "experiment": "threads"}),
                   on_epoch=lambda epoch, metrics: seen.append(torch.get_num_threads()), log_model=False)
    assert seen == [1] and torch.get_num_threads() == before
    from mlflow.tracking import MlflowClient

    assert MlflowClient(f"sqlite:///{tmp_path}/m.db").get_run(result.run_id).data.params["cpu_threads"] == "1"
