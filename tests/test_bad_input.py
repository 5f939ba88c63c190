"""A catalogue of user mistakes through the real CLI: each is one clear line, a non-zero exit, and no MLflow run."""

from __future__ import annotations

import time

import pytest
import torch

from dataset_files import write_hostile_cifar10
from helpers import assert_no_run, free_port, run_cli

CSV_OK = "a,b,label\n1,2,x\n3,4,y\n5,6,x\n7,8,y\n"
FILES = {
    "bad.yaml": "epochs: [1, 2\nlr: 0.1\n",
    "list.yaml": "- epochs\n- 3\n",
    "typed.yaml": "seed: ten\n",
    "unknown.yaml": "epoch: 3\n",
    "nameless.yaml": "opt: {lr: 0.1}\n",
    "split.yaml": "val_split: [0.1]\n",
    "component.yaml": "reg: 5\n",
    "nested.yaml": "opt: {name: sgd, momentun: 0.9}\n",
    "no-target.csv": CSV_OK.replace("label", "y"),
    "text-cell.csv": CSV_OK.replace("5,6", "5,six"),
    "ragged.csv": CSV_OK + "9\n",
    "folder.csv/.keep": "",
    "duplicate.yaml": "epochs: 1\nlr: 0.1\nepochs: 2\n",
    "bomb.yaml": "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcde", "bcdef")),
    "deep.yaml": "a: " + "[" * 3000 + "]" * 3000 + "\n",
    "nan.csv": CSV_OK.replace("3,4", "3,nan"),
    "one-class.csv": CSV_OK.replace(",y", ",x"),
    "not-a-database.db": "my notes\n",
}
BINARY_FILES = {"latin1.yaml": "epochs: 3 # caf\xe9\n".encode("latin-1")}


def case(*args: str, expect: str, marks=(), id: str):
    return pytest.param(list(args), expect, marks=marks, id=id)


CASES = [
    # unknown component names, each with a close-match suggestion
    case("--opt", "adamm", expect="unknown optimizer 'adamm'. Did you mean 'adam'", id="unknown-optimizer"),
    case("--model", "mpl", expect="unknown model 'mpl'. Did you mean 'mlp'", id="unknown-model"),
    case("--data", "digit", expect="unknown dataset 'digit'. Did you mean 'digits'", id="unknown-dataset"),
    case("--sched", "stepp", expect="unknown scheduler 'stepp'. Did you mean 'step'", id="unknown-scheduler"),
    case("--init", "xavier", expect="unknown initializer 'xavier'. Did you mean 'xavier-normal' or 'xavier-uniform'", id="unknown-init"),
    case("--reg", "l3", expect="unknown regularizer 'l3'. Did you mean 'l2'", id="unknown-regularizer"),
    case("--norm", "standrd", expect="unknown normalizer 'standrd'. Did you mean 'standard'", id="unknown-norm"),
    case("--loss", "cross-entrpy", expect="Did you mean 'cross-entropy'", id="unknown-loss"),
    case("--model", "mlp:activation=rleu", expect="unknown activation 'rleu'. Did you mean 'relu'", id="unknown-activation"),
    case("--aug", "no-such-aug", expect="unknown augmentation 'no-such-aug'", id="unknown-augmentation"),
    # unknown or ill-typed options
    case("--opt", "sgd:momentun=0.9", expect="no option 'momentun' (did you mean 'momentum'?)", id="unknown-option"),
    case("--opt", "sgd:momentum=fast", expect="option 'momentum' expects float, got 'fast'", id="option-not-float"),
    case("--opt", "sgd:nesterov=maybe", expect="option 'nesterov' expects bool", id="option-not-bool"),
    case("--model", "mlp:hidden=abc", expect="option 'hidden' expects list of int", id="option-not-int-list"),
    case("--sched", "step:step_size=2.5", expect="option 'step_size' expects int", id="option-not-int"),
    case("--opt", "sgd:momentum", expect="malformed option 'momentum'", id="option-without-value"),
    case("--data", "digits:image=maybe", expect="option 'image' expects bool", id="dataset-option-not-bool"),
    case("--epochs", "ten", expect="'ten' is not a valid integer", id="epochs-not-int"),
    case("--lr", "fast", expect="'fast' is not a valid float", id="lr-not-float"),
    case("--batch-size", "big", expect="'batch_size' expects int", id="batch-size-not-int"),
    case("--frobnicate", "1", expect="No such option '--frobnicate'", id="unknown-flag"),
    # values out of range
    case("--lr", "-0.1", expect="learning rate must be > 0", id="negative-lr"),
    case("--lr", "0", expect="learning rate must be > 0", id="zero-lr"),
    case("--opt", "sgd:lr=-1", expect="learning rate must be > 0", id="negative-optimizer-lr"),
    case("--lr", "inf", expect="learning rate must be > 0 and finite, got inf", id="infinite-lr"),
    case("--lr", "nan", expect="learning rate must be > 0 and finite, got nan", id="nan-lr"),
    case("--seed", "-1", expect="seed must be an integer in [0, 4294967295], got -1", id="negative-seed"),
    case("--seed", "99999999999999999999", expect="seed must be an integer in [0, 4294967295]", id="huge-seed"),
    case("--epochs", "99999999999999999999", expect="epochs must be an integer >= 1 and <= 1000000000",
         id="huge-epochs"),
    case("--val-split", "nan", expect="validation split must be in [0, 1), got nan", id="nan-val-split"),
    case("--opt", "sgd:momentum=nan", expect="option 'momentum' expects float, got 'nan'", id="nan-option"),
    case("--opt", "adam:lr=1e-3,lr=1e-2", expect="option 'lr' is given twice in 'adam:lr=1e-3,lr=1e-2'",
         id="option-given-twice"),
    case("--model", "mlp:hidden=[", expect="unbalanced brackets in 'hidden=[': a '[' or '(' is never closed",
         id="unclosed-bracket"),
    case("--model", "mlp:hidden=]64,32[", expect="unbalanced brackets in 'hidden=]64,32[': a ']' or ')' closes nothing",
         id="bracket-closing-nothing"),
    case("--epochs", "0", expect="epochs must be an integer >= 1", id="zero-epochs"),
    case("--epochs", "-3", expect="epochs must be an integer >= 1", id="negative-epochs"),
    case("--batch-size", "0", expect="batch size must be an integer >= 1", id="zero-batch-size"),
    case("--val-split", "1", expect="validation split must be in [0, 1)", id="val-split-one"),
    case("--val-split", "1.5", expect="validation split must be in [0, 1)", id="val-split-above-one"),
    case("--val-split", "-0.1", expect="validation split must be in [0, 1)", id="negative-val-split"),
    case("--test-split", "0", expect="test split must be in (0, 1)", id="zero-test-split"),
    case("--val-split", "0.5", "--test-split", "0.5", expect="leave no training data", id="no-training-data"),
    case("--model", "mlp:dropout=1.5", expect="dropout must be in [0, 1), got 1.5", id="dropout-above-one"),
    case("--model", "mlp:dropout=-0.1", expect="dropout must be in [0, 1), got -0.1", id="negative-dropout"),
    case("--reg", "dropout:p=1.5", expect="regularizer 'dropout': p must be in [0.0, 1.0), got 1.5",
         id="dropout-reg-above-one"),
    case("--reg", "l2:strength=-1", expect="regularizer 'l2': strength must be >= 0", id="negative-l2"),
    case("--device", "tpu", expect="device must be auto, cpu, cuda or cuda:N", id="unknown-device"),
    case("--device", "cuda", expect="no CUDA device is available",
         marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"), id="cuda-without-cuda"),
    # config files
    case("--config", "missing.yaml", expect="config file not found: missing.yaml", id="missing-config"),
    case("--config", "folder.csv", expect="File 'folder.csv' is a directory", id="config-is-a-folder"),
    case("--config", "bad.yaml", expect="config file bad.yaml is not valid YAML at line", id="malformed-yaml"),
    case("--config", "list.yaml", expect="must hold a mapping of keys to values, not list", id="yaml-not-a-mapping"),
    case("--config", "typed.yaml", expect="configuration key 'seed' expects int, got 'ten'", id="yaml-wrong-type"),
    case("--config", "unknown.yaml", expect="unknown configuration key 'epoch' (did you mean 'epochs'?)", id="yaml-unknown-key"),
    case("--config", "nameless.yaml", expect="needs a 'name' key", id="yaml-component-without-name"),
    case("--config", "split.yaml", expect="configuration key 'val_split' expects float", id="yaml-list-for-float"),
    case("--config", "component.yaml", expect="expected a component name", id="yaml-number-for-component"),
    case("--config", "nested.yaml", expect="no option 'momentun' (did you mean 'momentum'?)", id="yaml-unknown-option"),
    case("--config", "duplicate.yaml", expect="duplicate.yaml is not valid YAML at line 3: key 'epochs' is given twice",
         id="yaml-duplicate-key"),
    case("--config", "bomb.yaml", expect="bomb.yaml expands to more than 100000 values", id="yaml-alias-bomb"),
    case("--config", "deep.yaml", expect="deep.yaml is nested too deeply", id="yaml-too-deep"),
    case("--config", "latin1.yaml", expect="latin1.yaml is not UTF-8 text", id="yaml-not-utf8"),
    # data files
    case("--data", "csv:path=missing.csv,target=label", expect="dataset 'csv': missing.csv not found", id="missing-csv"),
    case("--data", "csv:path=folder.csv,target=label", expect="dataset 'csv': Is a directory: folder.csv",
         id="unreadable-csv"),
    case("--data", "csv:path=no-target.csv,target=label", expect="no column 'label'", id="csv-without-target"),
    case("--data", "csv:path=text-cell.csv,target=label", expect="'six', not a number", id="csv-non-numeric-cell"),
    case("--data", "csv:path=ragged.csv,target=label", expect="values for 3 columns", id="csv-ragged-row"),
    case("--data", "csv:path=nan.csv,target=label", expect="the training data holds nan in sample 1, column 'b'",
         id="csv-nan-cell"),
    case("--data", "csv:path=one-class.csv,target=label",
         expect="every sample is of the one class 'x'; classification needs at least 2 classes", id="csv-one-class"),
    case("--data", "csv:path=/dev/zero,target=label", expect="/dev/zero is not a regular file", id="csv-device-file"),
    case("--data", "linear:noise=nan", expect="option 'noise' expects float, got 'nan'", id="nan-dataset-option"),
    # data the model cannot take
    case("--aug", "hflip", "--data", "iris", expect="augmentation 'hflip' needs image inputs (C, H, W)",
         id="image-augmentation-on-vectors"),
    case("--data", "digits:image=true", "--model", "lenet", expect="lenet needs images of at least 12x12",
         id="small-images-to-lenet"),
    case("--data", "digits:image=false", "--model", "cnn",
         expect="model 'cnn' needs images (channels x height x width), but dataset 'digits' gives feature vectors",
         id="flat-data-to-cnn"),
    # combinations a technique cannot work with, refused before the run opens (optiflow_check_run)
    case("--opt", "lbfgs", "--reg", "weight-decay", expect="optimizer 'lbfgs' has no weight decay; use --reg l2",
         id="weight-decay-on-lbfgs"),
    case("--reg", "early-stopping", "--val-split", "0", expect="early-stopping monitors 'val_loss', but --val-split is 0",
         id="early-stopping-without-validation"),
    case("--data", "diabetes", "--reg", "label-smoothing", expect="label-smoothing needs a classification run",
         id="label-smoothing-on-regression"),
]


@pytest.fixture
def files(tmp_path):
    for name, text in FILES.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name, data in BINARY_FILES.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def assert_one_clear_line(result, expect: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert expect in lines[0]


@pytest.mark.parametrize("args, expect", CASES)
def test_train_refuses_bad_input_in_one_line_without_a_run(invoke, files, mlflow_client, experiment, args, expect):
    result = invoke("train", "--epochs", "1", *args) if "--epochs" not in args else invoke("train", *args)
    assert_one_clear_line(result, expect)
    assert result.exit_code == 2
    assert_no_run(mlflow_client, experiment)


@pytest.mark.parametrize(
    "args, expect",
    [
        ([], "no run 0123456789abcdef in the tracking store"),
        (["--lr", "0.1", "--epochs", "3"], "drop --epochs, --lr"),
    ],
    ids=["unknown-run", "changed-flags"],
)
def test_resume_refuses_what_it_cannot_continue(invoke, files, tracking_uri, args, expect):
    result = invoke("train", "--resume", "0123456789abcdef", "--tracking-uri", tracking_uri, *args, store=False)
    assert_one_clear_line(result, expect)
    assert result.exit_code == 2


def test_unreachable_tracking_server_fails_fast(invoke, files):
    port = free_port()
    started = time.monotonic()
    result = invoke("train", "--epochs", "1", "--tracking-uri", f"http://127.0.0.1:{port}", store=False)
    assert_one_clear_line(result, f"cannot reach the tracking store http://127.0.0.1:{port}: Connection refused")
    assert time.monotonic() - started < 60


def test_tracking_store_that_cannot_be_created(invoke, files):
    result = invoke("train", "--epochs", "1", "--tracking-uri", "sqlite:///folder.csv/.keep/mlflow.db", store=False)
    assert_one_clear_line(result, "cannot create the tracking store folder folder.csv/.keep")


def test_tracking_store_that_is_not_a_database_is_refused_untouched(invoke, files):
    result = invoke("train", "--epochs", "1", "--tracking-uri", "sqlite:///not-a-database.db", store=False)
    assert_one_clear_line(result, "the tracking store not-a-database.db exists and is not a SQLite database")
    assert result.exit_code == 2
    assert (files / "not-a-database.db").read_text() == "my notes\n"


SPACE = ("--space", "lr=loguniform:1e-4:1e-1", "--epochs", "1")


@pytest.mark.parametrize(
    "args, expect",
    [
        (["search", *SPACE, "--n-trials", "0"], "--n-trials must be >= 1, got 0"),
        (["search", *SPACE, "--timeout", "-1"], "--timeout must be a number of seconds > 0, got -1.0"),
        (["search", *SPACE, "--n-jobs", "0"], "--n-jobs must be >= 1, got 0"),
        (["search", *SPACE, "--sampler", "tpe:n_startup_trials=abc"],
         "sampler 'tpe': option 'n_startup_trials' expects int, got 'abc'"),
        (["search", "--space", "lr=loguniform:1e-4:inf", "--epochs", "1"], "learning rate must be > 0 and finite"),
        (["compare", "--vary", "lr=0.1", "--out", "/proc/x", "--epochs", "1"], "cannot create the output folder /proc/x"),
        (["reproduce", "0123", "--rtol", "-1"], "--rtol must be >= 0 and finite, got -1.0"),
    ],
    ids=["search-zero-trials", "search-negative-timeout", "search-zero-jobs", "search-sampler-option-not-int",
         "search-infinite-bound", "compare-out-in-proc", "reproduce-negative-rtol"],
)
def test_other_commands_refuse_bad_input_in_one_line_without_a_run(invoke, files, mlflow_client, experiment, args,
                                                                   expect):
    result = invoke(*args, store=args[0] != "reproduce")
    assert_one_clear_line(result, expect)
    assert result.exit_code == 2
    assert_no_run(mlflow_client, experiment)


@pytest.mark.parametrize("space", ["lr", "lr=loguniform:abc:1", "lr=warp:1:2"])
def test_unparseable_search_space(invoke, files, mlflow_client, experiment, space):
    result = invoke("search", "--space", space, "--epochs", "1")
    assert_one_clear_line(result, "lr")
    assert result.exit_code == 2
    assert_no_run(mlflow_client, experiment)


def test_list_refuses_an_unknown_kind(invoke):
    result = invoke("list", "optimizr")
    assert_one_clear_line(result, "unknown kind 'optimizr'")


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--opt", "adamm"], "Did you mean 'adam'"),
        (["--model", "mlp:dropout=1.5"], "dropout must be in [0, 1)"),
        (["--config", "bad.yaml"], "is not valid YAML"),
        (["--tracking-uri", "http://127.0.0.1:{port}"], "Connection refused"),
    ],
    ids=["unknown-name", "out-of-range", "malformed-yaml", "unreachable-tracking"],
)
def test_real_process_prints_one_line_and_exits_2(files, tracking_uri, experiment, mlflow_client, args, expect):
    args = [a.format(port=free_port()) for a in args]
    store = [] if "--tracking-uri" in args else ["--tracking-uri", tracking_uri]
    result = run_cli("train", "--epochs", "1", "--experiment", experiment, *store, *args, cwd=files, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], result.stderr
    assert_no_run(mlflow_client, experiment)


def test_unknown_component_in_a_real_process_has_no_traceback(tmp_path):
    proc = run_cli("train", "--opt", "adamw2", "-q", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown optimizer 'adamw2'" in proc.stderr
    assert not (tmp_path / "mlruns").exists() or not any((tmp_path / "mlruns").glob("artifacts/*/*"))


@pytest.mark.parametrize(
    "model, path, expect",
    [
        ("0123456789abcdef0123456789abcdef", "ragged.csv", "no run '0123456789abcdef0123456789abcdef' in the tracking store"),
        ("{run}", "missing.csv", "input not found: missing.csv"),
        ("{run}", "ragged.csv", "has no logged model at 'model'"),
        ("models:/no-such-model/1", "ragged.csv", "cannot load models:/no-such-model/1"),
    ],
    ids=["predict-unknown-run", "predict-missing-input", "predict-run-without-model", "predict-unknown-registered-model"],
)
def test_predict_refuses_bad_input_in_one_line(invoke, files, mlflow_client, experiment, model, path, expect):
    run_id = mlflow_client.create_run(mlflow_client.create_experiment(experiment)).info.run_id
    result = invoke("predict", model.format(run=run_id), "--input", path, "--tracking-uri", mlflow_client.tracking_uri)
    assert_one_clear_line(result, expect)
    assert result.exit_code == 2


def test_dataset_file_that_would_run_code_is_refused(invoke, tmp_path, mlflow_client, experiment):
    """A pickled CIFAR batch naming os.system: refused in one line, never unpickled, no run."""
    marker = tmp_path / "pwned"
    write_hostile_cifar10(tmp_path / "data", marker)
    result = invoke("train", "--data", "cifar10:download=false", "--data-dir", str(tmp_path / "data"), "--epochs", "1")
    assert_one_clear_line(result, "data_batch_1 is not a CIFAR-10 batch (it names posix.system); refusing to read it")
    assert result.exit_code == 2
    assert not marker.exists()
    assert_no_run(mlflow_client, experiment)
