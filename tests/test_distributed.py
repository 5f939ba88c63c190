"""Data-parallel training: one batch order sharded across ranks, the --nproc relaunch, two gloo processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from optiflow.data import LoaderBatches, TensorBatches
from optiflow.distributed import current, is_loopback, without_nproc

from dataset_files import write_csv
from helpers import assert_no_run, free_port, run_cli, runs_of


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


@pytest.mark.parametrize(("address", "loopback"), [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True),
                                                   ("localhost", True), ("10.0.0.7", False), ("node0", False)])
def test_only_loopback_master_addresses_pin_the_process_group_to_lo(address, loopback):
    """No name lookup: a host name may resolve to 127.0.1.1 on the machine itself and elsewhere to its real address."""
    assert is_loopback(address) is loopback


def test_the_cluster_counts_processes_and_machines(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("GROUP_WORLD_SIZE", raising=False)
    assert current().params() == {"world_size": 4, "nnodes": 2}
    monkeypatch.setenv("GROUP_WORLD_SIZE", "3")
    assert current().params() == {"world_size": 4, "nnodes": 3}
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(name)
    assert current().params() == {"world_size": 1, "nnodes": 1}


AGREE = """
import sys
from optiflow import distributed
from optiflow.errors import OptiflowError
try:
    distributed.agree(OptiflowError(sys.argv[1]) if sys.argv[1] else None)
except OptiflowError as exc:
    print(exc.exit_code, exc)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("verdicts", "said"), [
    (["", ""], ["", ""]),
    (["", "table.csv not found"], ["2 rank 1 (on {host}) stopped: table.csv not found", ""]),
    (["tracking store unreachable", ""], ["", "2 rank 0 (on {host}) stopped: tracking store unreachable"]),
    (["bad option", "bad option"], ["", ""]),  # each says its own error (the CLI prints rank 0's)
])
def test_processes_agree_on_their_input_checks_through_the_launchers_store(verdicts, said):
    """Every rank sets its verdict in the store torchrun (here a TCPStore on 127.0.0.1) serves and reads all of
    them: a sound rank learns which rank failed and why, with its exit code; a failed rank leaves raising to its
    caller."""
    import socket

    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(2)
    port = listener.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, master_listen_fd=listener.detach(),
                          wait_for_workers=False)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TORCHELASTIC_USE_AGENT_STORE": "True"}
    ranks = [subprocess.Popen([sys.executable, "-c", AGREE, verdict], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, text=True) for rank, verdict in enumerate(verdicts)]
    out = [process.communicate(timeout=120)[0].strip() for process in ranks]
    del store
    assert out == [line.format(host=socket.gethostname()) for line in said]


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


def listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses (hex, as in /proc/net/tcp*) of TCP sockets the processes ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                found.add(fields[1].rsplit(":", 1)[0])
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_nproc_listens_on_loopback_only(tracking_uri, experiment, tmp_path):
    """--nproc 2 opens its rendezvous store and process-group sockets on 127.0.0.1, never on every interface."""
    process = subprocess.Popen(
        [sys.executable, "-m", "optiflow", "train", "--epochs", "3", "--batch-size", "16", "-q", "--nproc", "2",
         "--tracking-uri", tracking_uri, "--experiment", experiment], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: set[str] = set()
    while process.poll() is None:
        children = {int(p) for p in open(f"/proc/{process.pid}/task/{process.pid}/children").read().split()} \
            if os.path.exists(f"/proc/{process.pid}") else set()
        seen |= listening_addresses({process.pid, *children})
        time.sleep(0.2)
    assert process.returncode == 0, process.stderr.read()
    assert seen, "no listening socket was seen"
    assert seen <= {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}, seen


def torchrun_node(port: int, cwd, *args: str) -> subprocess.Popen:
    """One torchrun "machine" of a two-node job whose rendezvous is on 127.0.0.1:``port``, training ``args``."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"optiflow-{port}",
         "--local-addr", "127.0.0.1", "-m", "optiflow", "train", "--epochs", "2", "-q", *args],
        cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)


@contextlib.contextmanager
def two_nodes(node0, node1, *args: str):
    """Both "machines" started at once (a random free rendezvous port); whatever is left is killed at the end."""
    port = free_port()
    nodes = [torchrun_node(port, node0, *args), torchrun_node(port, node1, *args)]
    try:
        yield nodes
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()


def children(pid: int) -> set[int]:
    try:
        return {int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()}
    except OSError:
        return set()


def error_lines(*texts: str) -> list[str]:
    return [line for text in texts for line in text.splitlines() if line.startswith("Error:")]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_two_torchrun_nodes_train_one_run_logged_once_by_rank_0(tracking_uri, experiment, tmp_path, mlflow_client):
    """Two torchrun agents on 127.0.0.1 (--nnodes 2, c10d rendezvous), one process each: one FINISHED run with
    world_size=2 and nnodes=2, each metric once per epoch, one model; the second machine logs and writes nothing;
    the training processes listen on loopback only (torchrun's own agents listen where torchrun decides)."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    common = ["--data", "digits", "--batch-size", "64", "--tracking-uri", tracking_uri, "--experiment", experiment]
    workers: set[int] = set()
    seen: set[str] = set()
    with two_nodes(node0, node1, *common) as nodes:
        deadline = time.monotonic() + 300
        while any(node.poll() is None for node in nodes) and time.monotonic() < deadline:
            current = set().union(*(children(node.pid) for node in nodes))
            workers |= current
            seen |= listening_addresses(current)
            time.sleep(0.2)
        outputs = [node.communicate(timeout=10) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert error_lines(*(out + err for out, err in outputs)) == []
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == "FINISHED"
    assert (run.data.params["world_size"], run.data.params["nnodes"]) == ("2", "2")
    for key in ("train_loss", "val_loss", "val_accuracy", "samples_per_sec"):
        assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert len(mlflow_client.get_metric_history(run.info.run_id, "test_accuracy")) == 1
    models = mlflow_client.search_logged_models([run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]
    assert not any(node1.iterdir()), "the second machine wrote files"
    assert len(workers) == 2, workers
    assert seen, "no listening socket of a training process was seen"
    assert seen <= {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}, seen


@pytest.mark.slow
def test_an_input_error_on_one_node_stops_both_before_any_run(tracking_uri, experiment, tmp_path, mlflow_client):
    """The data file exists on the first machine only: both processes stop before a run opens, and rank 0 says
    in one line which rank failed and why."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    write_csv(node0 / "table.csv")
    common = ["--data", "csv:path=table.csv,target=label", "--tracking-uri", tracking_uri, "--experiment", experiment]
    with two_nodes(node0, node1, *common) as nodes:
        outputs = [node.communicate(timeout=240) for node in nodes]
    assert all(node.returncode != 0 for node in nodes), outputs
    [line] = error_lines(*(out + err for out, err in outputs))
    assert line.startswith("Error: rank 1 ") and "table.csv not found" in line, line
    assert line in outputs[0][1], "rank 0 (the first machine) says it"
    assert "Traceback" not in outputs[0][1].split(line)[0], "no traceback from optiflow"
    assert_no_run(mlflow_client, experiment)


@pytest.mark.slow
def test_a_node_lost_during_training_ends_the_run_failed(tracking_uri, experiment, tmp_path, mlflow_client):
    """The second machine's training process dies (SIGKILL) mid-run: rank 0 stops and its run ends, never left
    RUNNING."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    common = ["--data", "digits", "--epochs", "5000", "--tracking-uri", tracking_uri, "--experiment", experiment]
    with two_nodes(node0, node1, *common) as nodes:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            runs = mlflow_client.search_runs([e.experiment_id for e in mlflow_client.search_experiments()
                                              if e.name == experiment])
            if runs and mlflow_client.get_metric_history(runs[0].info.run_id, "train_loss"):
                break
            assert all(node.poll() is None for node in nodes), [node.communicate() for node in nodes]
            time.sleep(0.5)
        else:
            pytest.fail("the run never logged an epoch")
        [worker] = children(nodes[1].pid)
        os.kill(worker, signal.SIGKILL)
        outputs = [node.communicate(timeout=120) for node in nodes]
    assert all(node.returncode != 0 for node in nodes), outputs
    [run] = runs_of(mlflow_client, experiment)
    # FAILED on the lost connection, or KILLED when torchrun's agent on the first machine, losing its peer,
    # sends SIGTERM first: ended either way, with the reason as its failure tag
    assert run.info.status in ("FAILED", "KILLED"), run.info.status
    assert run.data.tags.get("failure"), run.data.tags
