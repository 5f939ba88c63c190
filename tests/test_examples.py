"""Every example in examples/ runs at reduced size, draws its picture and writes its finding, so none rots."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

from optiflow.confidence import paired_test, t_interval

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES_DIR))
_spec = importlib.util.spec_from_file_location("examples_run", EXAMPLES_DIR / "run.py")
gallery = sys.modules["examples_run"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gallery)

EXAMPLES = gallery.load_examples()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_there_are_twelve_examples_numbered_in_order():
    assert [int(e.name[:2]) for e in EXAMPLES] == list(range(1, 13))


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_example_runs_at_reduced_size(example, tracking_uri, mlflow_client, tmp_path):
    result = gallery.run_example(example, tracking_uri, quick=True, out_dir=tmp_path)
    picture = tmp_path / f"{example.name}.png"
    assert result["picture"] == picture and picture.read_bytes()[:8] == PNG_MAGIC
    rows = result["numbers"]["rows"]
    assert len(rows) == example.picture["variants"], sorted(rows)
    for variant, row in rows.items():
        assert row and all(math.isfinite(v) for v in row.values() if isinstance(v, float)), (variant, row)
    finding = (tmp_path / "finding.md").read_text()
    assert all(variant in finding for variant in rows)
    _check_intervals(example, result["numbers"].get("intervals"), finding)
    experiment = mlflow_client.get_experiment_by_name(example.experiment)
    statuses = {r.info.status for r in mlflow_client.search_runs([experiment.experiment_id])}
    assert statuses <= {"FINISHED", "FAILED"} and "FINISHED" in statuses


def _check_intervals(example, found, finding):
    """An example compared over seeds writes the parent run's intervals and paired tests into its finding,
    and they are what the child runs' metrics give."""
    if "--repeats" not in " ".join(example.commands):
        assert found is None
        return
    assert found is not None and len(found["rows"]) == example.picture["variants"]
    baseline = found["rows"][found["baseline"]]
    for variant, row in found["rows"].items():
        assert len(row["seeds"]) == found["repeats"] >= 2, (variant, row)
        interval = t_interval(row["seeds"])
        assert (row["mean"], row["low"], row["high"]) == pytest.approx((interval.mean, interval.low, interval.high))
        assert f"| {variant} | {found['repeats']} | {gallery._format(row['mean'])} |" in finding
        if variant != found["baseline"]:  # children are in seed order, the same for every variant
            test = paired_test(dict(enumerate(row["seeds"])), dict(enumerate(baseline["seeds"])))
            assert (row["difference"], row["p"]) == pytest.approx((test.difference, test.p_value))
            assert row["significant"] == test.significant
    assert f"Differences to {found['baseline']} significant at 5%:" in finding


def test_readme_shows_every_example_with_its_commands_and_committed_picture():
    readme = (EXAMPLES_DIR / "README.md").read_text()
    flat = " ".join(readme.split())
    for example in EXAMPLES:
        image = f"{example.name}/{example.name}.png"
        assert f"]({image})" in readme, f"README does not show {image}"
        assert (EXAMPLES_DIR / image).read_bytes()[:8] == PNG_MAGIC, f"{image} is not committed"
        assert f"python examples/run.py {example.name}" in readme
        for command in example.commands:
            assert command in flat, f"README lacks the command of {example.name}: {command}"


def test_unknown_example_and_foreign_command_are_one_clear_error(capsys):
    assert gallery.main(["no-such-example"]) == 2
    assert re.search(r"no single example matches 'no-such-example'; choose from \d\d-", capsys.readouterr().err)
    with pytest.raises(gallery.ExampleError, match="must start with 'optiflow'"):
        EXAMPLES[0].argv("python train.py", quick=False, data_dir=None)


def test_data_dir_switches_the_cnn_example_to_fashion_mnist_and_is_refused_elsewhere(tmp_path):
    cnn = next(e for e in EXAMPLES if e.name == "11-cnn")
    argv = cnn.argv(cnn.commands[0], quick=True, data_dir=str(tmp_path))
    assert argv[argv.index("--data-dir") - 2 :] == ["--data", "fashion-mnist", "--data-dir", str(tmp_path),
                                                   "--experiment", "examples-11-cnn"]
    with pytest.raises(gallery.ExampleError, match="reads no files"):
        EXAMPLES[0].argv(EXAMPLES[0].commands[0], quick=False, data_dir=str(tmp_path))
